"""What ``--gradient-checkpointing`` costs in time and saves in memory per training step, as ratios against
the same step without it, measured in the same run.

    python benchmarks/bench_gradient_checkpointing.py                  # random Llama (hidden 256, 8 layers)
    python benchmarks/bench_gradient_checkpointing.py --real           # SmolLM2-135M (offline package)
    python benchmarks/bench_gradient_checkpointing.py --real --seq-len 512 --batch-size 4 --repeats 5

Rows: LoRA (the MLE guide) and BLoB (Trace_ELBO, per-token flipout, the official recipe's flipout), each
without and with activation checkpointing (``blob_pyro.assembly.enable_activation_checkpointing``, what
the flag calls). Every row runs in a fresh Python process, so one row's memory cannot leak into the next.

Memory is the host's resident set (this script measures the CPU path; on a GPU use
``torch.cuda.max_memory_allocated``): the kernel's peak-RSS counter (``VmHWM``) is reset through
``/proc/self/clear_refs`` after the model, guide and optimiser exist and one warm-up step has run, and
read after the timed steps; the row reports the peak minus the resident set just before the steps, i.e.
what the steps themselves allocate on top (activations kept for backward and temporaries; the
gradient buffers and the optimiser's state already exist after the warm-up).
Every row's process runs with a fixed glibc mmap threshold (``MALLOC_ENV``), so memory freed by one step
goes back to the kernel and the next step's peak is seen; the times are measured under that setting too
(every large block a fresh mapping, so both rows pay page faults). Linux only. Time: the median of ``--repeats`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# glibc raises its mmap threshold after a large block is freed and then keeps freed activations in the heap,
# where a later step reuses them without touching new pages: the peak would miss them. A fixed threshold
# sends every block over 128 KiB to mmap and back to the kernel on free.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

ROWS = [  # (label, guide, flipout, checkpointing)
    ("LoRA (MLE)", "mle", None, False),
    ("LoRA (MLE)", "mle", None, True),
    ("BLoB, token flipout", "blob", "token", False),
    ("BLoB, token flipout", "blob", "token", True),
]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def _build(real: bool, layers: int):
    import torch

    if real:
        from blob_pyro.pretrained import load_causal_lm

        network, _ = load_causal_lm("smollm2")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        network = LlamaForCausalLM(LlamaConfig(
            vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024,
        ))
    return network


def child(args) -> dict:
    """One row, in this process: build, warm up, reset the peak, time ``--repeats`` steps."""
    import gc

    import pyro
    import torch

    from blob_pyro.assembly import enable_activation_checkpointing
    from blob_pyro.guides import BLoBGuide, MLEGuide
    from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, bayesianize
    from blob_pyro.objectives import ELBOObjective, KLWeighting

    _, guide_name, flipout, checkpointing = ROWS[args.child]
    pyro.enable_validation(False)
    pyro.set_rng_seed(0)
    network = _build(args.real, args.layers)
    if checkpointing:
        enable_activation_checkpointing(network)
    bayesianize(network, ["q_proj", "v_proj", "lm_head"], rank=8, alpha=16)
    model = BayesianLoRAModel(network, AnswerTokenHead([10, 11, 12]))
    model.train()  # transformers checkpoints in training mode only
    guide = (BLoBGuide if guide_name == "blob" else MLEGuide)(model)
    objective = ELBOObjective(model, guide, num_data=640, total_steps=1000, kl=KLWeighting("constant", 160), lr=1e-4,
                              flipout=flipout)
    vocab = network.config.vocab_size
    ids = torch.randint(20, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3,
             "indices": torch.arange(args.batch_size)}
    objective.step(batch, 0)  # warm-up: the optimiser's state exists from here on
    gc.collect()
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    except OSError as err:
        raise SystemExit(f"cannot reset the peak resident set through /proc/self/clear_refs ({err}): this "
                         "benchmark needs Linux with a writable /proc (not every container allows it)") from None
    times = []
    for step in range(1, args.repeats + 1):
        start = time.perf_counter()
        objective.step(batch, step)
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    return {"seconds": statistics.median(times), "step_mib": (peak - before) / 1024, "resident_mib": before / 1024}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M (30 layers) instead of a random Llama")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the random Llama (ignored with --real)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (activations grow with it)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each row's process")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args)))
        return
    flags = ["--layers", str(args.layers), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
             "--repeats", str(args.repeats), "--threads", str(args.threads), *(["--real"] if args.real else [])]
    results = []
    for i, row in enumerate(ROWS):
        done = subprocess.run([sys.executable, __file__, "--child", str(i), *flags], capture_output=True, text=True,
                              env={**os.environ, **MALLOC_ENV})
        if done.returncode != 0:
            raise SystemExit(f"row {row[0]} (checkpointing {row[3]}) failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {row[0]}, checkpointing {'on' if row[3] else 'off'}: {results[-1]}", file=sys.stderr)
    model = "SmolLM2-135M (30 layers)" if args.real else f"random Llama, hidden 256 x {args.layers} layers"
    print(f"model: {model}, batch {args.batch_size} x {args.seq_len} tokens, {args.threads} thread(s), "
          f"median of {args.repeats} steps per row, each row in a fresh process")
    print("| method | grad. ckpt | step s | time vs off | step memory MiB | memory vs off |\n|---|---|---:|---:|---:|---:|")
    for (label, _, _, on), result, reference in zip(ROWS, results, [r for r in results[::2] for _ in (0, 1)]):
        print(f"| {label} | {'yes' if on else 'no'} | {result['seconds']:.3f} | {result['seconds'] / reference['seconds']:.2f}x "
              f"| {result['step_mib']:.0f} | {result['step_mib'] / reference['step_mib']:.2f}x |")


if __name__ == "__main__":
    main()
