"""What the baselines share: rebuilding a finished run, training (or reusing) the SVI runs a baseline builds
on, and writing a baseline's run.

A run directory written by ``python -m blob_pyro.train`` holds ``config.json``, ``adapter.safetensors``,
``guide.safetensors`` and ``metrics.json``; :func:`load_run` rebuilds model and guide from them. Reading and
writing the files of a run directory is :mod:`blob_pyro.rundir`'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyro
import torch

from blob_pyro.config import TrainConfig
from blob_pyro.rundir import (
    POST_HOC_FIELDS, config_differences_for_reuse, describe_differences, read_config_dict, save_predictions, write_json_atomic,
)

__all__ = [
    "LoadedRun", "load_run", "primary_mode", "write_baseline_run", "check_base_run", "train_base_run", "BASE_RUN_FIELDS",
]

def primary_mode(metrics: dict) -> str:
    """The mode that represents a method in comparison tables: its sampled predictive (``samples_N``,
    the paper's BLoB N = 10) if any, else any other non-baseline mode, else the point estimate ``mean``."""
    modes = [m for m in metrics if m not in ("zero_shot", "ood", "ood_detection") and isinstance(metrics[m], dict)]
    for prefix in ("samples_",):
        sampled = [m for m in modes if m.startswith(prefix)]
        if sampled:
            return sampled[0]
    others = [m for m in modes if m != "mean"]
    if others:
        return others[0]
    if "mean" in modes:
        return "mean"
    raise ValueError(f"metrics have no prediction mode (found keys {sorted(metrics)})")


@dataclass
class LoadedRun:
    """A finished run rebuilt in memory."""

    cfg: TrainConfig
    model: object
    guide: object
    data: object
    device: torch.device
    tokenizer: object = None

    def validation_batches(self, batch_size: Optional[int] = None) -> list:
        from blob_pyro.assembly import batches

        return batches(self.data, self.data.validation, batch_size=batch_size or self.cfg.eval_batch_size, device=self.device)


def load_run(run_dir, *, network=None, tokenizer=None, device: Optional[str] = None, dtype=None) -> LoadedRun:
    """Rebuild model, guide and tokenized data of the run in ``run_dir`` and restore its parameters.

    :param network, tokenizer: a fresh (never adapted) pretrained network and its tokenizer, to skip
        loading them again (a sequence classifier's must have been loaded right after
        ``pyro.set_rng_seed(run seed)``, or its frozen random head differs from the run's); default: loaded
        from the run's config.
    :param device: where to rebuild it (default: the run's ``--device``). :param dtype: of the frozen base
        (default: the run's ``--base-dtype``).
    """
    from blob_pyro.assembly import (
        build_guide, build_model, load_network, load_task, make_split, prepare_data, resolve_device, resolve_dtype,
    )
    from blob_pyro.checkpoint import load_adapter_and_guide

    run_dir = Path(run_dir)
    cfg = TrainConfig.load(run_dir / "config.json")
    pyro.clear_param_store()
    # A sequence classifier's new head is drawn at load time and frozen, and not saved with the adapters:
    # seeding as train does (same calls in the same order) draws the same head again.
    pyro.set_rng_seed(cfg.seed)
    device = resolve_device(device or cfg.device)
    task = load_task(cfg)
    split = make_split(cfg, task)
    if network is None:
        network, tokenizer = load_network(cfg, task.num_choices, dtype=dtype or resolve_dtype(cfg.base_dtype, device))
    network.to(device)
    data = prepare_data(cfg, task, split, tokenizer)
    model = build_model(cfg, network, data)
    guide = build_guide(cfg, model).to(device)
    load_adapter_and_guide(run_dir, model, guide)
    model.eval()
    return LoadedRun(cfg, model, guide, data, device, tokenizer)


def write_baseline_run(cfg: TrainConfig, metrics: dict, probs_by_mode: dict, labels, info: dict, *, predictive=None) -> dict:
    """Write a baseline's ``config.json``, ``predictions.npz`` and ``run.json``; with ``--eval-tasks`` evaluate
    them through the run's predictive (``predictive``, else :func:`blob_pyro.run_predictive.load_run_predictive`
    of the files just written) into ``metrics["ood"]`` / ``metrics["ood_detection"]``; ``metrics.json`` last,
    atomically (it marks the run finished)."""
    from blob_pyro.evaluation.report import results_table

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    save_predictions(out, probs_by_mode, labels)
    write_json_atomic(out / "run.json", info)
    if cfg.eval_task_specs:
        from blob_pyro.ood_eval import evaluate_ood_tasks_with
        from blob_pyro.run_predictive import load_run_predictive

        predictive = predictive or load_run_predictive(out, device=cfg.device)
        metrics["ood"], metrics["ood_detection"] = evaluate_ood_tasks_with(predictive, cfg)
    write_json_atomic(out / "metrics.json", metrics)  # last: marks the run finished
    print(results_table({k: v for k, v in metrics.items() if k not in ("ood", "ood_detection")}, title=f"\nmethod {cfg.method} ({out})"))
    for name, block in metrics.get("ood", {}).items():
        print(results_table(block, title=f"\nOOD {name} (method {cfg.method})"))
    return metrics


# Fields that must agree between a baseline and a reused --base-run (what shapes the model, data and seed).
BASE_RUN_FIELDS = (
    "model", "task", "task_format", "column_mapping", "task_type", "answer_scoring", "num_train", "num_validation",
    "num_calibration", "split_seed", "split_file", "max_length", "target_modules", "rank", "alpha", "seed", "max_steps", "batch_size",
)
REUSABLE_SUBDIRS = ("base", "member_0")


def check_base_run(cfg: TrainConfig, base_dir, **overrides) -> Path:
    """``base_dir`` if it is a finished run whose config agrees with ``cfg`` (plus ``overrides``) on every
    :data:`BASE_RUN_FIELDS` entry and on the guide; else a ``ValueError`` naming the fields that differ."""
    base_dir = Path(base_dir)
    for name in ("config.json", "metrics.json", "adapter.safetensors"):
        if not (base_dir / name).exists():
            raise ValueError(f"--base-run {base_dir}: no {name}; point it at a finished python -m blob_pyro.train run directory")
    recorded = {"num_calibration": 0, **json.loads((base_dir / "config.json").read_text())}  # older runs: no calibration
    expected = {**cfg.to_dict(), **overrides}
    fields = [*BASE_RUN_FIELDS, "guide", "lora_dropout"]
    differ = {f: (recorded.get(f), expected.get(f)) for f in fields if recorded.get(f) != expected.get(f)}
    if differ:
        detail = ", ".join(f"{f}: run has {a!r}, this run needs {b!r}" for f, (a, b) in differ.items())
        raise ValueError(f"--base-run {base_dir} does not match this run ({detail}); rerun it with those values or drop --base-run")
    return base_dir


def train_base_run(cfg: TrainConfig, subdir: str, **overrides) -> Path:
    """Train (or reuse, if it already has ``metrics.json``) the SVI run a baseline builds on, in
    ``<output_dir>/<subdir>`` with ``overrides`` applied to ``cfg``. Returns its directory. With
    ``cfg.resume`` a sub-run that left a checkpoint (e.g. an interrupted ensemble member) continues from it.

    With ``cfg.base_run`` set, the ``base`` / ``member_0`` run is that directory instead (checked by
    :func:`check_base_run`): the post-hoc baselines then cost no training."""
    from dataclasses import replace

    from blob_pyro.train import train

    if cfg.base_run and subdir in REUSABLE_SUBDIRS:
        return check_base_run(cfg, cfg.base_run, **{k: v for k, v in overrides.items() if k != "seed"})
    from blob_pyro.resume import checkpoint_path

    run_dir = Path(cfg.output_dir) / subdir
    # The sub-run evaluates no --eval-tasks itself: the baseline evaluates them through its own predictive.
    sub_cfg = replace(cfg, method="svi", output_dir=str(run_dir), overwrite=True, resume=False, eval_tasks="", **overrides)
    if (run_dir / "metrics.json").exists():
        differ = config_differences_for_reuse(read_config_dict(run_dir) or {"config.json": "unreadable"}, sub_cfg.to_dict(),
                                              ignore=(*POST_HOC_FIELDS, "eval_tasks", "eval_task_size"))
        if not differ:
            print(f"reusing the finished sub-run {run_dir} (its config matches)")
            return run_dir
        print(f"the finished sub-run {run_dir} was trained with another config ({describe_differences(differ)}): training it again")
    resume = cfg.resume and checkpoint_path(run_dir).exists()
    train(replace(sub_cfg, resume=resume))
    return run_dir
