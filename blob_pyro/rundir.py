"""Run directories you can trust: atomic run files, a finished marker written last, ``--overwrite`` that
clears the old run before the new one writes, and sub-runs reused only when their config matches.

* ``metrics.json`` marks a finished run (:data:`FINISHED_MARKER`). It is written last, and like
  ``config.json`` through :func:`write_text_atomic` (temporary file in the same folder, flushed to disk,
  renamed over the old one): a kill at any moment leaves the old file or the new one, never half of one.
* :func:`clear_run_dir` (``--overwrite`` without ``--resume``): removes ``metrics.json`` FIRST (from that moment
  the folder no longer looks finished), then every other file of the old run and its ``evaluation/`` folder.
  Sub-run folders (``base/``, ``member_<k>/``) stay only when the new run is a baseline that builds on sub-runs;
  each is then reused only if its config matches (:func:`sub_run_differences`), else trained again.
* The run's files: :func:`save_predictions` / :func:`load_predictions` (``predictions.npz``: the validation
  labels and the ``(n, K)`` predictive of every prediction mode, for reliability diagrams in
  ``blob_pyro.compare`` and the ensemble's mixture), :func:`write_split` (``split.json``),
  :func:`read_metrics` and :func:`read_config_dict`.
* :func:`config_differences_for_reuse`: the fields in which a finished run's ``config.json`` differs from the
  config a caller would run now (fields that change no number are ignored), so ``compare`` and the baselines
  can name them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from blob_pyro.config import RESULT_NEUTRAL_FIELDS

__all__ = [
    "FINISHED_MARKER", "SUB_RUN_PREFIXES", "POST_HOC_FIELDS", "write_text_atomic", "write_json_atomic", "is_finished",
    "looks_like_run_dir", "clear_run_dir", "config_differences_for_reuse", "describe_differences", "read_config_dict",
    "PREDICTIONS_FILE", "save_predictions", "load_predictions", "write_split", "read_metrics",
]

FINISHED_MARKER = "metrics.json"
#: Sub-run folders a baseline trains into (blob_pyro.baselines.common.train_base_run).
SUB_RUN_PREFIXES = ("base", "member_")
#: Run files by which a folder is recognised as a blob_pyro run (one is enough).
RUN_FILES = ("config.json", FINISHED_MARKER, "checkpoint.safetensors", "adapter.safetensors", "split.json")
#: Fields of a baseline that do not change the SVI sub-runs it builds on.
POST_HOC_FIELDS = (
    "method", "base_run", "ensemble_size", "laplace_hessian", "laplace_prior_precision", "laplace_predictive",
    "laplace_examples", "tfb_anchor_size", "tfb_nll_tolerance", "tfb_search_steps", "tfb_search_samples", "tfb_min_std",
    "tfb_max_std",
)
#: Fields that change neither the parameters nor the numbers of a run: a finished run is reused whatever
#: these hold (:data:`blob_pyro.config.RESULT_NEUTRAL_FIELDS`).
IGNORED_FIELDS = RESULT_NEUTRAL_FIELDS


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsync'd, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)  # atomic on POSIX, replacing an existing file (as os.replace)
    return path


def write_json_atomic(path, value, *, indent: int = 2, sort_keys: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


def is_finished(run_dir) -> bool:
    return (Path(run_dir) / FINISHED_MARKER).is_file()


def looks_like_run_dir(path) -> bool:
    """True if ``path`` holds a file that only a blob_pyro run writes (config.json, metrics.json, ...)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def _is_sub_run(name: str) -> bool:
    return name == "base" or (name.startswith("member_") and name[len("member_"):].isdigit())


def clear_run_dir(run_dir, *, keep_sub_runs: bool, log=print) -> list[str]:
    """Remove the old run in ``run_dir`` before a new run writes there; returns the names removed.

    ``metrics.json`` goes first, so a kill during the clearing (or during the new run) never leaves a
    folder that looks finished. Then every top-level file, ``evaluation/`` and ``plots/``; sub-run folders
    (``base/``, ``member_<k>/``) too unless ``keep_sub_runs`` (a baseline that reuses them after checking
    their config). Other sub-folders are left alone (they are not ours). A folder that does not look like a
    run (:func:`looks_like_run_dir`) is not touched.
    """
    run_dir = Path(run_dir)
    if not looks_like_run_dir(run_dir):
        return []
    removed = []
    marker = run_dir / FINISHED_MARKER
    if marker.exists():
        marker.unlink()
        removed.append(FINISHED_MARKER)
    for entry in sorted(run_dir.iterdir()):
        if entry.is_file() or entry.is_symlink():
            entry.unlink()
        elif entry.name in ("evaluation", "plots") or (_is_sub_run(entry.name) and not keep_sub_runs):
            shutil.rmtree(entry)
        else:
            continue
        removed.append(entry.name)
    if removed:
        log(f"--overwrite: removed the old run's files from {run_dir}: {', '.join(removed)}")
    return removed


def config_differences_for_reuse(recorded: dict, expected: dict, *, ignore: Iterable[str] = ()) -> dict[str, tuple]:
    """``{field: (recorded value, expected value)}`` for every field that differs, except
    :data:`IGNORED_FIELDS` and ``ignore``. A field missing on one side counts as different unless the
    other side holds the dataclass default (configs written before a field existed)."""
    from blob_pyro.config import TrainConfig

    defaults = {name: f.default for name, f in TrainConfig.__dataclass_fields__.items()}
    skip = set(IGNORED_FIELDS) | set(ignore)
    differ = {}
    for name in sorted(set(recorded) | set(expected)):
        if name in skip:
            continue
        theirs = recorded.get(name, defaults.get(name, "<missing>"))
        mine = expected.get(name, defaults.get(name, "<missing>"))
        if theirs != mine:
            differ[name] = (theirs, mine)
    return differ


def describe_differences(differ: dict[str, tuple]) -> str:
    """``--lr: run has 0.001, now 0.01; ...`` for a log line or an error message."""
    return "; ".join(f"--{name.replace('_', '-')}: run has {a!r}, now {b!r}" for name, (a, b) in differ.items())


def read_config_dict(run_dir) -> Optional[dict]:
    """The run's ``config.json`` as a dict, or None if it is missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(run_dir) -> dict:
    """The run's ``metrics.json`` (a finished run's: it is written last)."""
    return json.loads((Path(run_dir) / FINISHED_MARKER).read_text())


def write_split(run_dir, task_source: str, split: dict) -> Path:
    """Write ``split.json`` atomically: ``{"task": task_source, **split}`` (``split``: role -> task-file indices)."""
    return write_text_atomic(Path(run_dir) / "split.json", json.dumps({"task": task_source, **split}) + "\n")


PREDICTIONS_FILE = "predictions.npz"


def save_predictions(run_dir, probs_by_mode: dict, labels) -> None:
    """Write ``predictions.npz``: ``labels`` ``(n,)`` and one ``(n, K)`` float32 array per mode."""
    arrays = {"labels": np.asarray(labels, dtype=np.int64)}
    for mode, probs in probs_by_mode.items():
        probs = probs.detach().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
        if probs.shape != (len(arrays["labels"]), probs.shape[-1]):
            raise ValueError(f"predictions for mode {mode!r} have shape {probs.shape}, expected (n={len(arrays['labels'])}, K)")
        arrays[f"probs.{mode}"] = probs.astype(np.float32)
    path = Path(run_dir) / PREDICTIONS_FILE
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_predictions(run_dir) -> tuple[dict, np.ndarray]:
    """``({mode: (n, K) probs}, labels (n,))`` from a run's ``predictions.npz``."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run predates prediction files; rerun it (or pass --overwrite)")
    with np.load(path) as data:
        probs = {key[len("probs."):]: data[key] for key in data.files if key.startswith("probs.")}
        return probs, data["labels"]
