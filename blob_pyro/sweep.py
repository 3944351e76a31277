"""How calibration evolves with training length: ``python -m blob_pyro.sweep --epochs 1,4,12,31 --methods
mle,map,blob,blob_official --seeds 1,2 --output-dir results/x [any python -m blob_pyro.train flag]``.

For every number of epochs E, one :mod:`blob_pyro.compare` of the methods x seeds in
``<output-dir>/epochs_<E>`` with ``--max-steps E * ceil(n_train / batch_size)`` (n_train from ``--split-file``
when given, else ``--num-train``). Every flag after the sweep options goes to every run. Finished runs are
reused and unfinished ones resumed (compare's rules), so rerunning the same command continues a stopped
sweep; several sweeps with disjoint ``--methods`` or ``--seeds`` may run side by side on one output folder.

Outputs in ``<output-dir>``: ``sweep.csv`` / ``sweep.md`` (one row per method, prediction mode and E: mean and
std over the finished seeds of ACC %, ECE % (15 bins), NLL, Brier; for BLoB-guide runs the posterior's std of A
(min / median / max over all entries) and the median over layers of the noise / mean weight-update ratio
of :func:`blob_pyro.evaluation.weight_space.update_spread`; the mean |A| of the point estimate or posterior
mean (:func:`weight_summary`: read from the run's safetensors, cached in its ``weight_summary.json`` for clones
without them), the training NLL at the end of training and the last KL per training example
(:func:`training_summary`);
the mean training wall time) and ``sweep.png``: ACC, ECE and NLL against epochs, one line per method (dashed: a
sampling method's posterior-mean pass, N = 0), the band spanning the seeds' min to max; then the training NLL
and the median std of A against epochs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from blob_pyro import compare
from blob_pyro.config import TrainConfig
from blob_pyro.rundir import write_json_atomic

__all__ = ["main", "steps_for_epochs", "training_set_size", "collect", "plot_sweep", "posterior_summary",
           "training_summary", "weight_summary"]

PANELS = [("acc", "ACC %"), ("ece", "ECE % (15 bins)"), ("nll", "NLL")]
# Training-side panels, drawn from the first finished seed's files (log y axis): where the validation NLL
# parts from the training NLL (over-fitting) and how the posterior's spread grows with training length.
#: Per-run cache of :func:`weight_summary` (a few numbers), committed with the run's small files.
WEIGHT_SUMMARY = "weight_summary.json"
TRAINING_PANELS = [("train_nll_end", "train NLL (last 10 % of steps)"), ("std_median", "std of A (median entry)")]
TRAIN_TAIL = 0.1  # share of the logged steps averaged for train_nll_end


def training_set_size(cfg: TrainConfig) -> int:
    """Training examples per epoch: the ``train`` list of ``--split-file`` when given, else ``--num-train``;
    minus the ``--num-calibration`` examples carved out of it (unless the split file already lists them)."""
    if cfg.split_file:
        try:
            recorded = json.loads(Path(cfg.split_file).read_text())
            return len(recorded["train"]) - (0 if recorded.get("calibration") else cfg.num_calibration)
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"[sweep] cannot read the 'train' list of --split-file {cfg.split_file}: {err}") from None
    return cfg.num_train - cfg.num_calibration


def steps_for_epochs(epochs: float, *, num_train: int, batch_size: int) -> int:
    """Optimiser steps of ``epochs`` passes over ``num_train`` examples at ``batch_size`` (last batch partial)."""
    if not epochs > 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    return max(1, round(epochs * math.ceil(num_train / batch_size)))


def _epoch_dir(output_dir: Path, epochs: float) -> Path:
    return Path(output_dir) / f"epochs_{epochs:g}"


def collect(output_dir: Path, epochs: Sequence[float], methods: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """Rows of :func:`blob_pyro.compare.summarise` for every E with finished runs, each with an ``epochs`` key
    and the per-seed values (``<metric>_values``) for the bands."""
    rows = []
    for e in epochs:
        folder = _epoch_dir(output_dir, e)
        finished = [m for m in methods if compare.finished_seeds(folder, m, seeds)]
        if not finished:
            continue
        for row in compare.summarise(folder, finished, seeds, finished_only=True):
            row = {"epochs": e, **row}
            method = row["method"].removesuffix(" (N = 0)")
            if method in finished:
                per_seed = []
                for seed in compare.finished_seeds(folder, method, seeds):
                    metrics = json.loads((compare.run_dir(folder, method, seed) / "metrics.json").read_text())
                    per_seed.append(metrics[row["mode"]])
                for key, _, factor in compare.METRICS:
                    row[f"{key}_values"] = [m[key] * factor for m in per_seed]
                first = compare.run_dir(folder, method, compare.finished_seeds(folder, method, seeds)[0])
                row.update(training_summary(first))
                row.update(weight_summary(first))  # after: the guide's mean |A| wins over a logged one
            rows.append(row)
    return rows


def posterior_summary(run_dir: Path) -> Optional[dict]:
    """The std of A (``G^2``: BLoB's parameterisation, Wang et al. 2024 section 3.2) over every entry, and the
    median over layers of the sampled / mean weight-update ratio, read from a finished run's
    ``guide.safetensors`` and ``adapter.safetensors``; ``None`` for a guide without ``std_roots`` (e.g. MLE)."""
    from safetensors.torch import load_file

    from blob_pyro.evaluation.weight_space import update_spread

    run_dir = Path(run_dir)
    if not (run_dir / "guide.safetensors").is_file():
        return None
    guide = load_file(run_dir / "guide.safetensors")

    def by_site(prefix: str) -> dict:
        return {k[len(prefix):].removesuffix("_unconstrained"): v for k, v in guide.items()
                if k.startswith(prefix) and k.removesuffix("_unconstrained").endswith(".lora_A")}

    roots, locs = by_site("std_roots."), by_site("locs.")
    if not roots or set(roots) != set(locs):
        return None
    cfg = json.loads((run_dir / "config.json").read_text())
    adapter = load_file(run_dir / "adapter.safetensors")
    stds = {site: root.double() ** 2 for site, root in roots.items()}
    every = torch.cat([std.flatten() for std in stds.values()])
    ratios = sorted(update_spread(adapter[site.removesuffix("lora_A") + "lora_B"], locs[site], stds[site],
                                  scaling=cfg["alpha"] / cfg["rank"])["ratio"] for site in stds)
    return {"std_min": float(every.min()), "std_median": float(every.median()), "std_max": float(every.max()),
            "noise_to_mean_median": ratios[len(ratios) // 2]}


def read_train_log(path: Path) -> list[dict]:
    """The entries of a ``train_log.jsonl`` (one JSON object per line; blank lines skipped). A line that is not
    JSON (a file cut mid-write, edited by hand) raises a ValueError naming the file and the line."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}, is not valid JSON ({err.msg}): the training log is corrupt. Delete that line "
                "(and the ones after it) to report what was logged before it, or rerun the run (rerunning the same "
                "sweep command resumes from its last checkpoint)") from None
    return entries


def training_summary(run_dir: Path) -> dict:
    """What the training did, read from a finished run's files: ``train_nll_end``, the mean logged NLL over
    the last :data:`TRAIN_TAIL` of the logged steps (at least the last entry; each is one minibatch under one
    posterior draw in training mode, so a noisy, rough figure next to the validation NLL: far below it means
    over-fitting), ``kl_per_example_end``, the last logged prior term (the KL for a variational guide, a one-draw
    estimate under Trace_ELBO; ``-log p(A)`` for MAP) divided by the number of training examples (its size in
    the per-example objective next to the NLL), and ``mean_abs_A`` from the last training-log entry when it has
    one (what an autoguide's run has; for the library's guides :func:`weight_summary` reads it from the saved
    guide, over every LoRA A, and takes precedence in :func:`collect`). A key is left out
    when the run has no such record (no KL for MLE; a post-hoc run's folder, e.g. temperature or laplace_kfac,
    has none of them: see its base run's row)."""
    run_dir, out = Path(run_dir), {}
    log_file = run_dir / "train_log.jsonl"
    entries = read_train_log(log_file) if log_file.is_file() else []
    nlls = [e["nll"] for e in entries if e.get("nll") is not None]
    if nlls:
        tail = nlls[-max(1, math.ceil(TRAIN_TAIL * len(nlls))):]
        out["train_nll_end"] = sum(tail) / len(tail)
    kls = [e["kl"] for e in entries if e.get("kl") is not None]
    if kls and (run_dir / "split.json").is_file():
        num_train = len(json.loads((run_dir / "split.json").read_text())["train"])
        out["kl_per_example_end"] = kls[-1] / num_train
    if entries and entries[-1].get("mean_abs_A") is not None:  # e.g. an autoguide
        out["mean_abs_A"] = float(entries[-1]["mean_abs_A"])
    return out


def mean_abs_A(run_dir: Path) -> Optional[float]:
    """The mean |A| of the point estimate or of the posterior mean M over every entry, read from a finished
    run's ``guide.safetensors`` (the library's guides); ``None`` when it holds no LoRA A."""
    from safetensors.torch import load_file

    a = [v.double().abs().flatten() for k, v in load_file(Path(run_dir) / "guide.safetensors").items()
         if k.startswith(("locs.", "values.")) and k.removesuffix("_unconstrained").endswith(".lora_A")]
    return float(torch.cat(a).mean()) if a else None


def weight_summary(run_dir: Path) -> dict:
    """:func:`posterior_summary` and ``mean_abs_A`` (:func:`mean_abs_A`) of a finished run. Computed from its
    safetensors where they are, and then cached in the run's :data:`WEIGHT_SUMMARY` file; where they are not
    (they are large and not committed: a fresh clone, another machine) the cache is read instead, so a report
    rebuilt there keeps these columns. Empty when the run has neither (e.g. a post-hoc run's folder)."""
    run_dir = Path(run_dir)
    cache = run_dir / WEIGHT_SUMMARY
    if (run_dir / "guide.safetensors").is_file():
        out = dict(posterior_summary(run_dir) or {})
        if (value := mean_abs_A(run_dir)) is not None:
            out["mean_abs_A"] = value
        try:  # atomic: a report killed mid-write leaves the old cache or none, never half a file
            write_json_atomic(cache, {"source": "this run's guide.safetensors and adapter.safetensors", **out}, indent=1)
        except OSError as err:  # e.g. a read-only folder: the report goes on, only the cache is missing
            print(f"[sweep] could not write {cache} ({err}); this report has the values, a clone will not")
        return out
    if not cache.is_file():
        return {}
    try:
        return {k: float(v) for k, v in json.loads(cache.read_text()).items() if k != "source"}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{cache} is corrupt ({err}): delete it and rebuild the report where the run's "
                         "guide.safetensors and adapter.safetensors are, which writes it again") from None


def write_sweep_tables(output_dir: Path, rows: list[dict], *, header: str = "") -> str:
    """``sweep.csv`` and ``sweep.md``; returns the Markdown."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if not k.endswith("_values")]
    with open(Path(output_dir) / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, ""] if header else []
    lines += ["| epochs | method | mode | seeds | n | " + " | ".join(label for _, label, _ in compare.METRICS)
              + " | std of A min / median / max (first seed) | noise / mean update (median layer) | mean abs A"
              " | train NLL (last 10 %) | KL (MAP: -log p) / n_train, last | wall s (all seeds) |",
              "|---|---|---|---|---|" + "---|" * len(compare.METRICS) + "---|---|---|---|---|---|"]
    for r in rows:
        cells = [compare._fmt(r[f"{k}_mean"], r[f"{k}_std"], 2 if k in ("acc", "ece") else 3) for k, _, _ in compare.METRICS]
        std = f"{r['std_min']:.4f} / {r['std_median']:.4f} / {r['std_max']:.4f}" if "std_min" in r else ""
        ratio = f"{r['noise_to_mean_median']:.2f}" if "noise_to_mean_median" in r else ""
        wall = f"{r['wall_seconds']:.0f}" if math.isfinite(r.get("wall_seconds", float("nan"))) else ""
        extra = [f"{r[k]:.4g}" if k in r else "" for k in ("mean_abs_A", "train_nll_end", "kl_per_example_end")]
        lines.append(f"| {r['epochs']:g} | {r['method']} | {r['mode']} | {r['seeds']} | {r['n']} | " + " | ".join(cells)
                     + f" | {std} | {ratio} | " + " | ".join(extra) + f" | {wall} |")
    text = "\n".join(lines) + "\n"
    (Path(output_dir) / "sweep.md").write_text(text)
    return text


def plot_sweep(output_dir: Path, rows: list[dict], *, title: str = "") -> Path:
    """``sweep.png``: one panel per metric of :data:`PANELS` against epochs (log axis), one line per method,
    then the :data:`TRAINING_PANELS` (log y) for the methods whose runs record them (N = 0 rows left out:
    they share their run's training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("zero-shot")))
    panels = [*PANELS, *((k, label) for k, label in TRAINING_PANELS if any(k in r for r in rows))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    base_names = list(dict.fromkeys(n.removesuffix(" (N = 0)") for n in names))
    lengths = sorted({r["epochs"] for r in rows})
    for ax, (key, label) in zip(axes, panels):
        training = key not in dict(PANELS)
        for name in names:
            mine = sorted((r for r in rows if r["method"] == name and (not training or key in r)), key=lambda r: r["epochs"])
            if not mine or (training and name.endswith("(N = 0)")):
                continue
            x = [r["epochs"] for r in mine]
            colour = colours[base_names.index(name.removesuffix(" (N = 0)")) % len(colours)]
            style = "--" if name.endswith("(N = 0)") else "-"
            y = [r[key] for r in mine] if training else [r[f"{key}_mean"] for r in mine]
            ax.plot(x, y, style, marker="o", ms=3, color=colour, label=name)
            values = [] if training else [r.get(f"{key}_values", []) for r in mine]
            if any(len(v) > 1 for v in values):
                ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.15, lw=0)
        zero = [r for r in rows if r["method"].startswith("zero-shot")]
        if zero and not training:
            ax.axhline(zero[0][f"{key}_mean"], color="gray", lw=1, ls=":", label="zero-shot")
        ax.set(xscale="log", xlabel="epochs", ylabel=label + (" (first seed)" if training else ""))
        ax.set_xticks(lengths, [f"{e:g}" for e in lengths])  # the sweep's lengths, not powers of ten
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if training:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # one legend for all panels, beside them, over no data
    fig.legend(handles, labels, fontsize=8, loc="center right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    out = Path(output_dir) / "sweep.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m blob_pyro.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--epochs", required=True, help="comma-separated training lengths in epochs, e.g. 1,4,12,31")
    parser.add_argument("--methods", required=True, help="comma-separated compare methods, e.g. mle,map,blob,blob_official")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds")
    parser.add_argument("--output-dir", required=True, help="folder of the sweep (one epochs_<E> compare folder per E)")
    parser.add_argument("--report-only", action="store_true", help="start no run: tables and figure from the finished runs")
    args, train_args = parser.parse_known_args(argv)
    try:
        epochs = sorted({float(e) for e in args.epochs.split(",") if e.strip()})
    except ValueError:
        parser.error(f"--epochs must be comma-separated numbers, got {args.epochs!r}")
    if not epochs or min(epochs) <= 0:
        parser.error(f"--epochs must list positive numbers, got {args.epochs!r}")
    if "--max-steps" in train_args:
        parser.error("--max-steps is set by the sweep from --epochs; remove it")
    cfg = TrainConfig.from_argv(train_args, prog="python -m blob_pyro.sweep")
    num_train, methods = training_set_size(cfg), [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    output_dir = Path(args.output_dir)
    for e in epochs:
        steps = steps_for_epochs(e, num_train=num_train, batch_size=cfg.batch_size)
        print(f"[sweep] {e:g} epochs = {steps} steps ({num_train} examples, batch {cfg.batch_size})", flush=True)
        compare_argv = ["--methods", ",".join(methods), "--seeds", ",".join(map(str, seeds)),
                        "--output-dir", str(_epoch_dir(output_dir, e)), *train_args, "--max-steps", str(steps)]
        if args.report_only:
            compare_argv.insert(0, "--report-only")
        try:
            compare.main(compare_argv)
        except SystemExit as err:  # --report-only with nothing finished at this E yet
            print(f"[sweep] {e:g} epochs: {err}")
    rows = collect(output_dir, epochs, methods, seeds)
    if not rows:
        raise SystemExit(f"[sweep] no finished run under {output_dir}")
    command = "python -m blob_pyro.sweep " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    print(write_sweep_tables(output_dir, rows, header=f"Command: `{command}`"))
    print(f"[sweep] wrote {plot_sweep(output_dir, rows, title=str(output_dir))}")
    return rows


if __name__ == "__main__":
    main()
