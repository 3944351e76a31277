"""Speed of one training step and of evaluation, as ratios against a plain-torch reference measured in
the same run (medians of repeated timings; the machines are shared and noisy).

    python benchmarks/bench_step.py                 # a Llama-shaped random model (hidden 256, 4 layers)
    python benchmarks/bench_step.py --real          # SmolLM2-135M (offline package), batch 4

Rows: plain-torch LoRA step (reference: same adapters, A a plain tensor, CE loss, AdamW, no Pyro);
MLE through SVI; BLoB through SVI with Trace_ELBO, TraceMeanField_ELBO, per-token flipout; and
evaluation with the posterior mean (N = 0) against Predictive with N = 10.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

from blob_pyro.evaluation.predictive import posterior_mean_probs, sample_probs
from blob_pyro.guides import BLoBGuide, MLEGuide
from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, bayesianize
from blob_pyro.objectives import ELBOObjective, KLWeighting


def build(real: bool):
    if real:
        from blob_pyro.pretrained import load_causal_lm

        network, _ = load_causal_lm("smollm2")
        vocab = network.config.vocab_size
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        vocab = 1000
        network = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256,
        ))
    bayesianize(network, ["q_proj", "v_proj", "lm_head"], rank=8, alpha=16)
    return BayesianLoRAModel(network, AnswerTokenHead([10, 11, 12])), vocab


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="use SmolLM2-135M instead of a random model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    pyro.enable_validation(False)
    model, vocab = build(args.real)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, vocab, (args.batch_size, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3,
             "indices": torch.arange(args.batch_size)}
    rows = {}

    # Reference: the same adapters driven by plain torch (A a leaf tensor, no Pyro handlers).
    A = {s: torch.nn.Parameter(torch.randn(layer.rank, layer.in_features) * 0.02) for s, layer in model.adapters.items()}
    params = list(A.values()) + [layer.lora_B for layer in model.adapters.values()]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def torch_step():
        for s, layer in model.adapters.items():
            layer.set_transient(active_A=A[s], active_B=layer.lora_B, flipout=None)
        logits = model.head(model.network, batch["input_ids"], batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows["plain torch LoRA step (reference)"] = timed(torch_step, args.repeats)
    for name, guide_cls, elbo, flipout in [
        ("MLE via SVI", MLEGuide, "trace", None),
        ("BLoB via SVI, Trace_ELBO", BLoBGuide, "trace", None),
        ("BLoB via SVI, TraceMeanField_ELBO", BLoBGuide, "meanfield", None),
        ("BLoB via SVI, Trace_ELBO + per-token flipout", BLoBGuide, "trace", "token"),
    ]:
        pyro.clear_param_store()
        guide = guide_cls(model)
        objective = ELBOObjective(model, guide, num_data=640, total_steps=1000, kl=KLWeighting("constant", 160),
                                  lr=1e-4, elbo=elbo, flipout=flipout)
        step = iter(range(10**6))
        rows[name] = timed(lambda: objective.step(batch, next(step)), args.repeats)

    model.eval()
    guide = BLoBGuide(model)
    eval_batches = [batch]
    t0 = timed(lambda: posterior_mean_probs(model, guide, eval_batches), args.repeats)
    t10 = timed(lambda: sample_probs(model, guide, eval_batches, num_samples=10), max(3, args.repeats // 2))

    ref = rows["plain torch LoRA step (reference)"]
    print(f"model: {'SmolLM2-135M' if args.real else 'random Llama hidden 256 x 4 layers'}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats}")
    print("| training step | median s | ratio vs plain torch |\n|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.4f} | {seconds / ref:.2f}x |")
    print("\n| evaluation | median s | ratio vs N = 0 |\n|---|---|---|")
    print(f"| posterior mean (N = 0) | {t0:.4f} | 1.00x |")
    print(f"| Predictive, N = 10 | {t10:.4f} | {t10 / t0:.2f}x (Predictive on the guide draws 10 A's, then 10 conditioned forward passes) |")


if __name__ == "__main__":
    main()
