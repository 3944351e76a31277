"""Validate before writing: every check that needs no model, run before an output directory is touched.

``python -m blob_pyro.train`` calls :func:`check_train_inputs` first: the output directory (a file? a finished
run without ``--overwrite``? a checkpoint without ``--resume``?), ``--device``, ``--model`` (alias installed,
local folder present), ``--task`` and ``--split-file`` (readable), ``--num-train`` / ``--num-validation``
against the data, every ``--eval-tasks`` task, and ``--base-run``. It returns the task and split it loaded,
so the run does not read them twice. Checks that need the model (tokenization, the shared-prompt probe, the
classifier head, a PEFT adapter's layers, the OOD tasks' classes) run in ``train`` before training and
before any run file is written. ``evaluate``, ``compare`` and ``export`` use the same helpers.

Every message says what was expected, what was found and what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from blob_pyro.config import TrainConfig
from blob_pyro.rundir import FINISHED_MARKER

__all__ = ["PreflightError", "Preflight", "check_train_inputs", "check_device", "check_model", "check_output_dir",
           "check_task", "check_eval_tasks", "check_run_dir"]


class PreflightError(ValueError):
    """A bad input found before anything was written."""


@dataclass
class Preflight:
    """What the checks loaded: the task and its split (positions into ``task.examples``)."""

    task: object
    split: object


def check_device(spec: str, flag: str = "--device") -> None:
    from blob_pyro.assembly import resolve_device

    try:
        resolve_device(spec)
    except ValueError:
        raise PreflightError(f"{flag} {spec}: expected a device this machine has, found no CUDA GPU "
                             "(torch.cuda.is_available() is False); use --device cpu or auto") from None
    except RuntimeError as err:
        raise PreflightError(f"{flag} {spec!r}: expected auto, cpu or cuda[:i], found an unknown device ({err}); "
                             "use --device cpu or auto") from None


def check_model(spec: str, flag: str = "--model") -> None:
    """An alias whose package is installed, an existing ``save_pretrained`` folder, or a hub id."""
    from blob_pyro.pretrained import resolve_model_spec

    try:
        resolved = resolve_model_spec(spec)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        raise PreflightError(f"{flag} {spec!r}: {err}") from None
    path = Path(resolved)
    if path.is_dir() and not (path / "config.json").exists() and not any(path.glob("*.gguf")):
        raise PreflightError(
            f"{flag} {spec!r}: expected a folder written by save_pretrained (with config.json), found {path} without "
            "config.json; pass the folder that holds the model's config.json and weights"
        )


def check_output_dir(out: Path, *, overwrite: bool, resume: bool = False, flag: str = "--output-dir",
                     what: str = "a finished run") -> None:
    from blob_pyro.resume import CHECKPOINT_FILE

    if out.exists() and not out.is_dir():
        raise PreflightError(f"{flag} {out}: expected a directory (or a path to create), found a file; choose another {flag}")
    if resume:
        if not (out / CHECKPOINT_FILE).exists():
            finished = " (it holds metrics.json: the run has finished)" if (out / FINISHED_MARKER).exists() else ""
            raise PreflightError(f"--resume: expected a checkpoint to continue from, but {out} holds no "
                                 f"{CHECKPOINT_FILE}{finished}; run without --resume to start the run")
        return
    if (out / FINISHED_MARKER).exists() and not overwrite:
        raise PreflightError(f"{flag} {out} already holds {what} ({FINISHED_MARKER}); pass --overwrite to replace it "
                             f"or choose another {flag}")
    if (out / CHECKPOINT_FILE).exists() and not overwrite:
        raise PreflightError(f"{flag} {out} holds an unfinished run with a checkpoint ({CHECKPOINT_FILE}): pass --resume "
                             "to continue it, or --overwrite to start again from step 0")


def check_task(cfg: TrainConfig, spec: Optional[str] = None, *, flag: str = "--task", roles=("train", "validation")):
    """The task ``spec`` loaded (no tokenizer, no model); a ``PreflightError`` naming the flag if it cannot be."""
    from blob_pyro.assembly import load_task

    spec = cfg.task if spec is None else spec
    try:
        return load_task(cfg, spec, roles=roles)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise PreflightError(f"{flag} {spec!r} cannot be loaded: {err}") from None


def check_split(cfg: TrainConfig, task):
    from blob_pyro.assembly import make_split

    if cfg.split_file:
        path = Path(cfg.split_file)
        if not path.is_file():
            raise PreflightError(f"--split-file {cfg.split_file!r}: expected a JSON file with 'train' and 'validation' "
                                 "index lists, found no such file; pass an existing split file or drop --split-file")
        try:
            return make_split(cfg, task)
        except (ValueError, KeyError, TypeError) as err:
            raise PreflightError(f"--split-file {cfg.split_file!r} does not fit task {task.name!r}: {err}") from None
    try:
        return make_split(cfg, task)
    except ValueError as err:
        raise PreflightError(
            f"--num-train {cfg.num_train} / --num-validation {cfg.num_validation} do not fit task {task.name!r} "
            f"({len(task)} examples): {err}"
        ) from None


def check_eval_tasks(cfg: TrainConfig, task) -> list:
    """Every ``--eval-tasks`` task loaded: not twice, not the training task, and (sequence classification)
    with the training task's number of classes."""
    from blob_pyro.data import task_spec_name

    loaded, names = [], set()
    for spec in cfg.eval_task_specs:
        name = task_spec_name(spec)
        if name in names or spec == cfg.task:
            raise PreflightError(f"--eval-tasks names {name!r} twice or names the training task; expected each other "
                                 "task once: remove the repeat")
        names.add(name)
        other = check_task(cfg, spec, flag="--eval-tasks", roles=("validation",))
        if cfg.task_type == "sequence_classification" and other.num_choices != task.num_choices:
            raise PreflightError(
                f"--eval-tasks {spec}: expected {task.num_choices} classes (the classifier head of {task.name}), found "
                f"{other.num_choices}; with --task-type sequence_classification evaluate only tasks with the same classes"
            )
        loaded.append(other)
    return loaded


def check_base_run_dir(cfg: TrainConfig) -> None:
    from blob_pyro.baselines.common import check_base_run

    if cfg.base_run and cfg.method != "svi":
        try:
            if cfg.method == "temperature":  # the likely mistake first, with its fix
                from blob_pyro.baselines.temperature import require_calibration_split

                if Path(cfg.base_run).is_dir():
                    require_calibration_split(cfg.base_run)
            check_base_run(cfg, cfg.base_run)
        except ValueError as err:
            raise PreflightError(str(err)) from None


def check_train_inputs(cfg: TrainConfig) -> Preflight:
    """Every check of a training run that needs no model; raises :class:`PreflightError` before any file."""
    check_output_dir(Path(cfg.output_dir), overwrite=cfg.overwrite, resume=cfg.resume and cfg.method == "svi")
    check_device(cfg.device)
    check_model(cfg.model)
    check_base_run_dir(cfg)
    task = check_task(cfg)
    split = check_split(cfg, task)
    check_eval_tasks(cfg, task)
    return Preflight(task, split)


def check_run_dir(run_dir: Path, *, flag: str = "--run-dir") -> TrainConfig:
    """A finished training run's config (for evaluate / export); a ``PreflightError`` saying what is missing."""
    if not run_dir.exists():
        raise PreflightError(f"{flag} {run_dir}: expected the --output-dir of a training run, found no such directory")
    if not run_dir.is_dir():
        raise PreflightError(f"{flag} {run_dir}: expected a run directory, found a file; pass the --output-dir of a training run")
    path = run_dir / "config.json"
    if not path.exists():
        raise PreflightError(f"{flag} {run_dir}: expected config.json, found none: it is not a directory written by "
                             "python -m blob_pyro.train; pass the --output-dir of a training run")
    try:
        json.loads(path.read_text())
        cfg = TrainConfig.load(path)
    except (ValueError, TypeError) as err:
        raise PreflightError(f"{flag} {run_dir}: config.json is unreadable ({err}); rerun the training run") from None
    if not (run_dir / FINISHED_MARKER).exists():
        raise PreflightError(f"{flag} {run_dir}: expected a finished run ({FINISHED_MARKER}), found none: the run is "
                             "unfinished or failed; finish it (--resume if it left a checkpoint) or rerun it")
    return cfg
