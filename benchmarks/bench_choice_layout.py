"""Choice-likelihood batches: the shared-prompt layout against the separate layout, measured side by side.

    python benchmarks/bench_choice_layout.py                              # SmolLM2-135M, bundled social_iqa
    python benchmarks/bench_choice_layout.py --task ../shared/data/bigbench/winowhy.json
    python benchmarks/bench_choice_layout.py --model <dir> --batches 4    # any causal LM directory

The reference is ``--choice-layout separate`` (K rows per example, prompt + one choice each) on the same
model, adapter, examples and batches; timings alternate between the layouts in every repeat, and the
script prints medians and their ratio (separate / shared_prompt), tokens per batch, and the largest
difference of the class logits between the layouts (float error only).

Rows: one BLoB training step (SVI, Trace_ELBO: forward and backward through the adapted network) and one
no-grad evaluation forward at the posterior mean.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

from blob_pyro.assembly import (
    batches, build_guide, build_model, build_objective, load_network, load_task, make_split, prepare_data,
)
from blob_pyro.config import TrainConfig
from blob_pyro.evaluation.predictive import posterior_mean_probs

LAYOUTS = ("separate", "shared_prompt")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="as --model of blob_pyro.train")
    parser.add_argument("--task", default="bundled:social_iqa", help="as --task of blob_pyro.train")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch size (examples)")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="evaluation batch size (examples)")
    parser.add_argument("--batches", type=int, default=3, help="distinct batches per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (after one warm-up); medians reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pyro.enable_validation(False)
    cfg = {layout: TrainConfig(model=args.model, task=args.task, choice_layout=layout, num_validation=args.batches * args.eval_batch_size)
           for layout in LAYOUTS}
    task = load_task(cfg["separate"])
    split = make_split(cfg["separate"], task)
    network, tokenizer = load_network(cfg["separate"], task.num_choices, dtype=torch.float32)
    data = {layout: prepare_data(cfg[layout], task, split, tokenizer) for layout in LAYOUTS}
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = build_model(cfg["separate"], network, data["separate"])
    guide = build_guide(cfg["separate"], model)
    objective = build_objective(cfg["separate"], model, guide, num_data=len(data["separate"].train))
    with torch.no_grad():  # a non-zero adapter, so that the comparison covers the LoRA path
        for adapter in model.adapters.values():
            adapter.lora_B.normal_(0, 0.01)

    cpu = torch.device("cpu")
    train = {layout: batches(data[layout], data[layout].train.first(args.batches * args.batch_size), batch_size=args.batch_size, device=cpu)
             for layout in LAYOUTS}
    val = {layout: batches(data[layout], data[layout].validation, batch_size=args.eval_batch_size, device=cpu) for layout in LAYOUTS}

    def logits(layout):  # log-probabilities at the posterior mean, (n, K)
        return posterior_mean_probs(model, guide, val[layout]).log()

    difference = (logits("shared_prompt") - logits("separate")).abs().max().item()

    def train_steps(layout):
        for step, b in enumerate(train[layout]):
            objective.step(b, step)

    def eval_forward(layout):
        logits(layout)

    times = {(row, layout): [] for row in ("train", "eval") for layout in LAYOUTS}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up
        for layout in (LAYOUTS if repeat % 2 else LAYOUTS[::-1]):
            for row, fn in (("train", train_steps), ("eval", eval_forward)):
                start = time.perf_counter()
                fn(layout)
                if repeat:
                    times[row, layout].append(time.perf_counter() - start)

    tokens = {layout: statistics.mean(int(b["attention_mask"].shape[0] * b["attention_mask"].shape[1]) for b in train[layout])
              for layout in LAYOUTS}
    print(f"model {args.model}, task {task.name} (K = {task.num_choices}), threads {torch.get_num_threads()}, "
          f"{args.repeats} repeats of {args.batches} batches")
    print(f"padded tokens per training batch of {args.batch_size}: separate {tokens['separate']:.0f}, "
          f"shared_prompt {tokens['shared_prompt']:.0f} (ratio {tokens['separate'] / tokens['shared_prompt']:.2f})")
    print(f"largest class-logit difference between the layouts: {difference:.2e}")
    print(f"{'row':<34}{'separate s':>12}{'shared s':>12}{'speed-up':>10}")
    for row, label in (("train", f"BLoB SVI step (batch {args.batch_size})"), ("eval", f"eval forward (batch {args.eval_batch_size})")):
        sep = statistics.median(times[row, "separate"]) / args.batches
        shared = statistics.median(times[row, "shared_prompt"]) / args.batches
        print(f"{label:<34}{sep:>12.3f}{shared:>12.3f}{sep / shared:>9.2f}x")


if __name__ == "__main__":
    main()
