"""Compare methods x seeds on one task: ``python -m blob_pyro.compare --methods blob,mle,mc_dropout --seeds 1,2
--output-dir results/x [any python -m blob_pyro.train flag, e.g. --task ... --max-steps 300]``.

Each (method, seed) is one ``python -m blob_pyro.train`` run in ``<output-dir>/<method>/seed_<seed>`` (a
subprocess, so memory is freed between runs). A run directory that already holds ``metrics.json`` is
reused when its ``config.json`` matches the config compare would run (else the differing fields are named
and it runs again), so interrupting and rerunning continues where it stopped: a run of the same config that
left a training checkpoint (``checkpoint.safetensors``, also in an ensemble member's directory) continues
from it with ``--resume``. Before any run starts, every method's config is parsed and the checks that need
no model (device, model, task, split sizes, ``--eval-tasks``) run for it. ``--eval-tasks`` works for every
method; ``--ood-columns`` tables the OOD tasks (``results_ood.md``/``.csv``: ACC, ECE, NLL, AUROC, AUPR).
SIGTERM (forwarded) or Ctrl-C stops the running training after its current step and checkpoint.
``--report-only`` starts no run and tables whatever has finished (the header names what has not).
Outputs in ``<output-dir>``:

* ``results.md`` and ``results.csv``: mean +- std over seeds (sample std, ddof = 1) of ACC %, ECE %
  (15 bins), NLL and Brier of each method's primary predictive (its ``samples_N`` if it samples, else the
  point estimate), plus a ``<method> (N = 0)`` row for methods that also have a posterior-mean pass;
* ``reliability_<method>.png``: reliability diagram of the primary predictive, seeds pooled.

Methods: every registered guide (``blob``, ``mle``, ``map``, ``meanfield``, ``normal``, ``lowrank``) or
an autoguide import path (``module:Class``), run with ``--guide``; and the baselines ``mc_dropout``
(``--guide mle --lora-dropout 0.1``), ``ensemble`` (``--guide mle``), ``laplace`` (``--guide map``; the
``--laplace-*`` defaults: diagonal GGN, MC predictive), ``laplace_kfac`` (``--guide map --laplace-hessian
kfac --laplace-predictive probit``, Laplace-LoRA as in the paper), ``tfb`` (``--guide mle``), ``blob_official``
(``--guide blob --recipe official``: the official update rule; compare's own flags override the recipe), ``temperature``
(``--guide mle``; needs ``--num-calibration K`` among the shared flags, so that every method trains on the same
``num_train - K`` examples and T is fitted on the K held out). Flags given after the compare options apply to every run; a method's own
flags come last and win.

Post-hoc baselines reuse the run they build on when its method is in the list (:data:`BASE_METHOD`):
``laplace`` and ``laplace_kfac`` fit to ``map/seed_<s>``, ``tfb`` and ``temperature`` to ``mle/seed_<s>``, and ``ensemble`` takes ``mle/seed_<s>``
as member 0 (``--base-run``), so those cost no extra training; base methods run first. Their wall time
in the table is then the post-hoc part only.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from blob_pyro.baselines.common import primary_mode
from blob_pyro.rundir import load_predictions
from blob_pyro.interrupt import stop_on_signals
from blob_pyro.resume import CHECKPOINT_FILE
from blob_pyro.rundir import describe_differences

__all__ = ["METHOD_FLAGS", "BASE_METHOD", "method_flags", "run_order", "main", "summarise", "write_tables", "plot_reliability",
           "ood_rows", "write_ood_tables", "run_config_differences", "preflight"]



def _method_table() -> tuple[dict, dict]:
    """``(METHOD_FLAGS, BASE_METHOD)`` from the registries: every baseline's ``compare`` entries
    (``blob_pyro.baselines.register_method``) and one ``<guide>_<recipe>`` method per recipe (``blob_official``:
    BLoB as its official code trains it; the flags given to compare, e.g. --lr or --kllr, still override the
    recipe's values)."""
    from blob_pyro.baselines import registered_methods
    from blob_pyro.config import RECIPES

    flags, bases = {}, {}
    for name, method in registered_methods().items():
        for alias, extra in method.compare.items():
            flags[alias] = ["--method", name, *extra]
            if method.base_method is not None:
                bases[alias] = method.base_method
    for recipe, values in RECIPES.items():
        flags[f"{values['guide']}_{recipe}"] = ["--guide", values["guide"], "--recipe", recipe]
    return flags, bases


#: ``{compare method: train flags}`` of the methods that are not a plain ``--guide`` (derived, see above).
#: ``{baseline: the method whose run of the same seed it builds on}``.
METHOD_FLAGS, BASE_METHOD = _method_table()
METRICS = [("acc", "ACC %", 100.0), ("ece", "ECE % (15 bins)", 1.0), ("nll", "NLL", 1.0), ("brier", "Brier", 1.0)]


def method_flags(method: str) -> list[str]:
    """The ``blob_pyro.train`` flags that select ``method``."""
    from blob_pyro.guides import registered_guides, resolve_guide

    if method in METHOD_FLAGS:
        return list(METHOD_FLAGS[method])
    if method in registered_guides():
        return ["--guide", method]
    if ":" in method:
        resolve_guide(method)  # a typo or a refused autoguide fails before any run starts
        return ["--guide", method]
    raise ValueError(f"unknown method {method!r}; valid: {sorted(registered_guides()) + sorted(METHOD_FLAGS)} or an autoguide "
                     "'module:Class' (any LoRAGuide subclass by import path too)")


def run_dir(output_dir: Path, method: str, seed: int) -> Path:
    return Path(output_dir) / method.replace(":", "_") / f"seed_{seed}"


def run_order(methods: Sequence[str]) -> list[str]:
    """``methods`` with every listed base method (:data:`BASE_METHOD`) moved before its baselines."""
    bases = [m for m in methods if m in BASE_METHOD.values()]
    return bases + [m for m in methods if m not in bases]


def run_one(output_dir: Path, method: str, seed: int, train_args: list[str], *, log=print,
            methods: Sequence[str] = ()) -> Path:
    """Run (or reuse) one method x seed; raises if the training subprocess fails. A post-hoc baseline whose
    base method is in ``methods`` gets ``--base-run`` pointing at that method's run of the same seed."""
    path = run_dir(output_dir, method, seed)
    base = BASE_METHOD.get(method)
    reuse = ["--base-run", str(run_dir(output_dir, base, seed))] if base in methods else []
    argv = [*train_args, "--seed", str(seed), "--output-dir", str(path), "--overwrite", *method_flags(method), *reuse]
    differ = run_config_differences(path, argv)
    if (path / "metrics.json").exists() and not differ:
        log(f"[compare] {method} seed {seed}: reusing {path} (finished, same config)")
        return path
    if differ:  # finished or interrupted with other settings: start again (--overwrite clears it)
        log(f"[compare] {method} seed {seed}: {path} was run with another config ({describe_differences(differ)}); running it again")
    elif path.is_dir() and any(path.rglob(CHECKPOINT_FILE)):  # an interrupted run of this config
        argv.append("--resume")
    log(f"[compare] {method} seed {seed}: python -m blob_pyro.train {shlex.join(argv)}")
    start = time.perf_counter()
    run_training(argv)
    log(f"[compare] {method} seed {seed}: done in {time.perf_counter() - start:.0f} s")
    return path


def expected_config(argv: list[str]):
    """The TrainConfig that ``python -m blob_pyro.train argv`` would run."""
    from blob_pyro.config import TrainConfig

    return TrainConfig.from_argv(argv)


def run_config_differences(path: Path, argv: list[str]) -> dict:
    """``{field: (recorded, now)}`` between the run in ``path`` (its ``config.json``) and ``argv``; empty when
    there is no config.json yet. Fields that change no number (output dir, device, logging) are ignored."""
    from blob_pyro.rundir import config_differences_for_reuse, read_config_dict

    if not (path / "config.json").exists():
        return {}
    recorded = read_config_dict(path)
    if recorded is None:
        return {"config.json": ("unreadable", "a run config")}
    return config_differences_for_reuse(recorded, expected_config(argv).to_dict())


def preflight(output_dir: Path, methods: Sequence[str], seeds: Sequence[int], train_args: list[str]) -> None:
    """Before any run starts or any folder is made: every method's config parses, and the checks that need no
    model (device, model, task, split sizes, --eval-tasks) pass for it; a ``SystemExit`` naming the method."""
    from blob_pyro.preflight import PreflightError, check_device, check_eval_tasks, check_model, check_split, check_task

    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"[compare] --output-dir {output_dir}: expected a directory (or a path to create), found a file; "
                         "choose another --output-dir")
    checked = set()
    for method, seed in [(m, s) for m in methods for s in seeds]:
        path = run_dir(output_dir, method, seed)
        argv = [*train_args, "--seed", str(seed), "--output-dir", str(path), "--overwrite", *method_flags(method)]
        try:
            cfg = expected_config(argv)
        except SystemExit as err:
            raise SystemExit(f"[compare] method {method}: {err}") from None
        if (path / "metrics.json").exists() and not run_config_differences(path, argv):
            continue  # will be reused, not run
        key = (cfg.device, cfg.model, cfg.task, cfg.split_file, cfg.num_train, cfg.num_validation, cfg.eval_tasks, cfg.task_type,
               cfg.data_dir, cfg.column_mapping, cfg.task_format)
        if key in checked:
            continue
        checked.add(key)
        try:
            check_device(cfg.device)
            check_model(cfg.model)
            task = check_task(cfg)
            check_split(cfg, task)
            check_eval_tasks(cfg, task)
        except PreflightError as err:
            raise SystemExit(f"[compare] method {method}: {err}") from None


def run_training(argv: list[str]) -> None:
    """``python -m blob_pyro.train argv`` in a subprocess. A SIGTERM to compare is forwarded to it, and
    compare waits while it finishes its step and writes its checkpoint (Ctrl-C reaches both directly), then
    exits saying how to resume. Raises ``CalledProcessError`` if the run fails."""
    process = subprocess.Popen([sys.executable, "-m", "blob_pyro.train", *argv])
    forwarded = False
    with stop_on_signals() as stop:
        while process.poll() is None:
            if stop.signum == signal.SIGTERM and not forwarded:
                process.send_signal(signal.SIGTERM)
                forwarded = True
            time.sleep(0.2)
    if stop.signum is not None:
        raise SystemExit(f"[compare] {stop.name}: the training run stopped (exit status {process.returncode}); rerun "
                         "the same compare command to continue from its checkpoint")
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args)


def _row(name: str, mode: str, entries: list[dict], wall: float) -> dict:
    row = {"method": name, "mode": mode, "seeds": len(entries), "n": entries[0]["n_examples"], "wall_seconds": wall}
    for key, _, factor in METRICS:
        values = np.array([e[key] * factor for e in entries])
        row[f"{key}_mean"] = float(values.mean())
        row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return row


def finished_seeds(output_dir: Path, method: str, seeds: Sequence[int]) -> list[int]:
    """The seeds of ``method`` whose run directory holds ``metrics.json``."""
    return [seed for seed in seeds if (run_dir(output_dir, method, seed) / "metrics.json").is_file()]


def zero_shot_row(output_dir: Path, methods: Sequence[str], seeds: Sequence[int]) -> Optional[dict]:
    """The pretrained model before training (B = 0), per seed from the first method's run that evaluated it
    (the split, hence the validation set, is the same for every method of a seed); ``None`` if none did."""
    entries = []
    for seed in seeds:
        for method in [m for m in methods if seed in finished_seeds(output_dir, m, seeds)]:
            metrics = json.loads((run_dir(output_dir, method, seed) / "metrics.json").read_text())
            if "zero_shot" in metrics:
                entries.append(metrics["zero_shot"])
                break
    return _row("zero-shot (B = 0)", "mean", entries, float("nan")) if entries else None


def _is_baseline(method: str) -> bool:
    """A ``--method`` baseline (its ``mean`` mode is not a posterior mean of one SVI run); guides, autoguides
    and recipe methods such as ``blob_official`` are SVI runs."""
    return "--method" in METHOD_FLAGS.get(method, [])


def summarise(output_dir: Path, methods: Sequence[str], seeds: Sequence[int], *, finished_only: bool = False) -> list[dict]:
    """One row per method (and per method's N = 0 pass): mean and std over seeds of every metric; first a
    zero-shot row when the runs evaluated the base model. ``finished_only``: summarise the seeds that have
    finished (the ``seeds`` column says how many) and leave out methods with none, instead of failing."""
    rows = [r for r in [zero_shot_row(output_dir, methods, seeds)] if r]
    for method in methods:
        per_mode: dict[str, list[dict]] = {}
        walls = []
        for seed in finished_seeds(output_dir, method, seeds) if finished_only else seeds:
            path = run_dir(output_dir, method, seed)
            metrics = json.loads((path / "metrics.json").read_text())
            primary = primary_mode(metrics)
            per_mode.setdefault(f"{method}", []).append({**metrics[primary], "mode": primary})
            if primary != "mean" and "mean" in metrics and not _is_baseline(method):
                per_mode.setdefault(f"{method} (N = 0)", []).append({**metrics["mean"], "mode": "mean"})
            info = path / "run.json"
            if info.exists():
                walls.append(json.loads(info.read_text()).get("wall_seconds", float("nan")))
        for name, entries in per_mode.items():
            rows.append(_row(name, entries[0]["mode"], entries, float(np.nansum(walls)) if name == method else float("nan")))
    return rows


def _fmt(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def write_tables(output_dir: Path, rows: list[dict], *, header: str = "") -> str:
    """Write ``results.csv`` and ``results.md``; returns the Markdown."""
    output_dir = Path(output_dir)
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, ""] if header else []
    lines += ["| method | mode | seeds | n | " + " | ".join(label for _, label, _ in METRICS) + " | wall s (all seeds) |",
              "|---|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for r in rows:
        cells = [_fmt(r[f"{k}_mean"], r[f"{k}_std"], 2 if k in ("acc", "ece") else 3) for k, _, _ in METRICS]
        wall = f"{r['wall_seconds']:.0f}" if np.isfinite(r["wall_seconds"]) else ""
        lines.append(f"| {r['method']} | {r['mode']} | {r['seeds']} | {r['n']} | " + " | ".join(cells) + f" | {wall} |")
    text = "\n".join(lines) + "\n"
    (output_dir / "results.md").write_text(text)
    return text


OOD_METRICS = [("acc", "ACC %", 100.0), ("ece", "ECE %", 1.0), ("nll", "NLL", 1.0)]
OOD_DETECTION = [("entropy", "auroc", "AUROC entropy"), ("mutual_information", "auroc", "AUROC MI"),
                 ("entropy", "aupr", "AUPR entropy")]


def ood_rows(output_dir: Path, methods: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """One row per (method, OOD task): mean and std over the finished seeds of ACC / ECE / NLL of the
    method's primary predictive on the task and of the OOD-detection scores of :data:`OOD_DETECTION`."""
    rows = []
    for method in methods:
        per_task: dict[str, list[dict]] = {}
        for seed in finished_seeds(output_dir, method, seeds):
            metrics = json.loads((run_dir(output_dir, method, seed) / "metrics.json").read_text())
            for task, block in metrics.get("ood", {}).items():
                mode = primary_mode(block)
                entry = {key: block[mode][key] * factor for key, _, factor in OOD_METRICS}
                detection = metrics.get("ood_detection", {}).get(task, {})
                for score, stat, label in OOD_DETECTION:
                    entry[label] = detection.get(score, {}).get(stat, float("nan"))
                per_task.setdefault(task, []).append({**entry, "mode": mode})
        for task, entries in per_task.items():
            row = {"method": method, "ood_task": task, "mode": entries[0]["mode"], "seeds": len(entries)}
            for key in [k for k, _, _ in OOD_METRICS] + [label for _, _, label in OOD_DETECTION]:
                values = np.array([e[key] for e in entries], dtype=float)
                row[f"{key}_mean"] = float(values.mean())
                row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            rows.append(row)
    return rows


def write_ood_tables(output_dir: Path, rows: list[dict]) -> str:
    """``results_ood.csv`` and ``results_ood.md`` from :func:`ood_rows`; returns the Markdown."""
    output_dir = Path(output_dir)
    if not rows:
        text = "No OOD results: the runs have no 'ood' block (train them with --eval-tasks)\n"
        (output_dir / "results_ood.md").write_text(text)
        return text
    with open(output_dir / "results_ood.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    labels = [label for _, label, _ in OOD_METRICS] + [label for _, _, label in OOD_DETECTION]
    keys = [k for k, _, _ in OOD_METRICS] + [label for _, _, label in OOD_DETECTION]
    lines = ["OOD tasks (trained on the run's task, evaluated without training on these); detection: OOD = positive, "
             "against the run's validation set", "",
             "| method | OOD task | mode | seeds | " + " | ".join(labels) + " |", "|---|---|---|---|" + "---|" * len(labels)]
    for r in rows:
        cells = [_fmt(r[f"{k}_mean"], r[f"{k}_std"], 2 if k in ("acc", "ece") else 3) for k in keys]
        lines.append(f"| {r['method']} | {r['ood_task']} | {r['mode']} | {r['seeds']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (output_dir / "results_ood.md").write_text(text)
    return text


def plot_reliability(output_dir: Path, method: str, seeds: Sequence[int], *, num_bins: int = 15) -> Path:
    """``reliability_<method>.png``: per-bin accuracy vs confidence of the primary predictive, seeds pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blob_pyro.evaluation.metrics import expected_calibration_error, reliability_bins

    probs, labels = [], []
    for seed in finished_seeds(output_dir, method, seeds):
        path = run_dir(output_dir, method, seed)
        mode = primary_mode(json.loads((path / "metrics.json").read_text()))
        by_mode, y = load_predictions(path)
        probs.append(by_mode[mode])
        labels.append(y)
    p, y = np.concatenate(probs), np.concatenate(labels)
    bins = reliability_bins(p, y, num_bins=num_bins)
    ece = 100 * expected_calibration_error(p, y, num_bins=num_bins)
    edges, width = bins["edges"], 1.0 / num_bins
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = bins["count"] > 0
    ax.bar(edges[:-1][filled], bins["accuracy"][filled], width=width, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
    gap = bins["confidence"][filled] - bins["accuracy"][filled]
    ax.bar(edges[:-1][filled], gap, bottom=bins["accuracy"][filled], width=width, align="edge", color="tab:red", alpha=0.35, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{method} ({mode}): ECE {ece:.2f}%, n = {len(y)}")
    ax.legend(loc="upper left", fontsize=8)
    ax_count.bar(edges[:-1], bins["count"], width=width, align="edge", color="gray", edgecolor="black")
    ax_count.set(xlabel=f"confidence ({num_bins} bins)", ylabel="count")
    fig.tight_layout()
    out = Path(output_dir) / f"reliability_{method.replace(':', '_')}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _num_calibration(train_args: Sequence[str]) -> int:
    """The last ``--num-calibration`` value among the shared train flags (0 when absent or unreadable)."""
    value = "0"
    for i, arg in enumerate(train_args):
        if arg == "--num-calibration" and i + 1 < len(train_args):
            value = train_args[i + 1]
        elif arg.startswith("--num-calibration="):
            value = arg.split("=", 1)[1]
    try:
        return int(value)
    except ValueError:
        return 0


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="python -m blob_pyro.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # "--seed" must not be read as "--seeds"
    )
    parser.add_argument("--methods", required=True, help="comma-separated methods, e.g. blob,mle,map,meanfield,mc_dropout,ensemble,laplace,laplace_kfac,tfb,temperature")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds, e.g. 1,2,3")
    parser.add_argument("--output-dir", required=True, help="folder of the runs, tables and diagrams")
    parser.add_argument("--report-only", action="store_true",
                        help="start no run: write the tables and diagrams from the runs that have finished (e.g. while "
                             "another compare is still running), naming the missing ones")
    parser.add_argument("--ood-columns", action="store_true",
                        help="also table each method's OOD tasks (the runs' --eval-tasks): ACC, ECE, NLL of its primary "
                             "predictive and OOD-detection AUROC/AUPR against its validation set (entropy, mutual "
                             "information), in results_ood.md / results_ood.csv")
    args, train_args = parser.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    for method in methods:
        method_flags(method)  # fail on a typo before any run starts
    for flag in ("--seed", "--output-dir", "--guide", "--method"):
        if flag in train_args:
            parser.error(f"{flag} is set by compare per run; remove it (use --seeds / --methods)")
    if "temperature" in methods and not args.report_only and not _num_calibration(train_args):
        parser.error("method temperature fits T on calibration examples carved from the training data: pass "
                     "--num-calibration K (e.g. 64), which every method's run then holds out of training")
    output_dir = Path(args.output_dir)
    if args.ood_columns and not any(a == "--eval-tasks" or a.startswith("--eval-tasks=") for a in train_args):
        parser.error("--ood-columns tables the runs' OOD tasks: pass --eval-tasks TASK[,TASK...] too")
    if not args.report_only:
        preflight(output_dir, methods, seeds, train_args)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not args.report_only:
        for method in run_order(methods):
            for seed in seeds:
                run_one(output_dir, method, seed, train_args, methods=methods)
    missing = [f"{method} seed {seed}" for method in methods for seed in seeds
               if seed not in finished_seeds(output_dir, method, seeds)]
    reported = [method for method in methods if finished_seeds(output_dir, method, seeds)]
    if not reported:
        raise SystemExit(f"[compare] no finished run (metrics.json) under {output_dir} for methods {methods} x seeds {seeds}")
    rows = summarise(output_dir, reported, seeds, finished_only=True)
    command = "python -m blob_pyro.compare " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    header = (f"Command: `{command}`  \nMachine: {platform.machine()} {platform.processor() or ''} "
              f"{platform.system()}, Python {platform.python_version()}; compare wall time this invocation "
              f"{time.perf_counter() - start:.0f} s (finished runs are reused; per-method wall times below are from their run.json)")
    if missing:
        header += f"  \nNot finished, left out of the table: {', '.join(missing)}"
    print(write_tables(output_dir, rows, header=header))
    if args.ood_columns:
        print(write_ood_tables(output_dir, ood_rows(output_dir, reported, seeds)))
    for method in reported:
        print(f"[compare] wrote {plot_reliability(output_dir, method, seeds)}")
    return rows


if __name__ == "__main__":
    main()
