"""Training checkpoints for ``--checkpoint-every`` / ``--resume``: one safetensors file, no pickle.

``<output_dir>/checkpoint.safetensors`` holds every tensor of the training state; its header metadata
holds the rest as JSON (key ``"state"``; optimiser structure via :mod:`blob_pyro.state_codec`):

* ``model/<name>``: every trainable parameter of the model (LoRA B; A of non-Bayesian sites);
* ``guide/<name>``: the guide's ``state_dict()`` (BLoB: M and G of every site);
* ``param_store/<name>``: Pyro parameters that live outside the modules (the hierarchical prior's scale),
  unconstrained, with their constraint's name;
* ``objective/...``: every optimiser and LR-scheduler state (the ELBO objective's per-parameter AdamW +
  LambdaLR inside Pyro's optimiser; both optimisers and schedulers of the parity objective);
* ``rng/...``: torch CPU (and CUDA) generator states; numpy and Python ``random`` states;
* JSON: the number of finished steps, the position in the data order ``(epoch, index)``, the KL-cycle
  counter (cycle length, position, next pi_t: checked against the rebuilt objective), the metrics computed
  before training (zero-shot), the byte length of ``train_log.jsonl``, the run config.

A SHA-256 of the tensors, in the metadata, is checked on reading. The file is written to a temporary name in the same directory, flushed to disk and renamed over the old
one (``os.replace``), so a kill at any moment leaves either the previous or the new checkpoint, never a
half-written one. Resuming with the same config continues bitwise exactly (tested against uninterrupted
runs). Config fields that may differ on resume: :data:`FREE_FIELDS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyro
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributions import constraints

from blob_pyro.config import RESULT_NEUTRAL_FIELDS, TrainConfig
from blob_pyro.state_codec import flatten, unflatten

__all__ = [
    "CHECKPOINT_FILE", "FREE_FIELDS", "TrainingCheckpoint", "checkpoint_path", "read_checkpoint", "config_differences", "open_for_resume",
    "save_checkpoint", "restore_training_state", "check_optimiser_state_restored", "continue_train_log",
]

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "blob_pyro.training_checkpoint/1"

#: Config fields that may differ between a checkpoint and ``--resume``: they change neither the trained
#: parameters nor the metrics. ``device`` may name another device of the same type (``cuda:0`` ->
#: ``cuda:1``, ``auto`` -> ``cuda``); another type (cpu <-> cuda) is refused: other kernels, other RNG.
#: ``log_every`` changes only which steps are logged from the resumed step on; ``draws_per_pass`` only how the
#: evaluation draws are batched (the same draws; metrics equal up to float rounding, not bitwise);
#: ``gradient_checkpointing`` only whether the layers' activations are stored or recomputed in the backward pass
#: (the same random state and draws; the same parameters up to float rounding, bitwise in the CPU test of
#: tests/test_gradient_checkpointing.py); ``dist_timeout_minutes`` only how long processes wait for each other.
FREE_FIELDS = RESULT_NEUTRAL_FIELDS  # free to differ between a checkpoint and the run that resumes it

#: Constraints of Pyro parameters outside the modules that a checkpoint can name (JSON, not pickle).
CONSTRAINTS = {
    "real": constraints.real, "positive": constraints.positive, "nonnegative": constraints.nonnegative,
    "unit_interval": constraints.unit_interval, "simplex": constraints.simplex,
    "lower_cholesky": constraints.lower_cholesky, "positive_definite": constraints.positive_definite,
}


@dataclass
class TrainingCheckpoint:
    """A checkpoint read back: ``state`` is the decoded structure (tensors in place), ``path`` its file."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        """Training steps finished when it was written (the index of the next step)."""
        return int(self.state["step"])


def checkpoint_path(output_dir) -> Path:
    return Path(output_dir) / CHECKPOINT_FILE


# --- Reading and checking ----------------------------------------------------------------------------


def read_checkpoint(output_dir) -> TrainingCheckpoint:
    """Read and decode ``<output_dir>/checkpoint.safetensors``; a missing, truncated or corrupt file raises
    ``ValueError`` naming it. Reading changes no file."""
    path = checkpoint_path(output_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run wrote no checkpoint yet (see --checkpoint-every)")
    advice = (f"nothing was changed in {path.parent}; start the run again with --overwrite instead of --resume "
              "(or restore the file from a backup)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        if metadata.get("sha256") != _digest(tensors):
            raise ValueError("the tensors' checksum differs from the one recorded when the file was written")
        state = unflatten(json.loads(metadata["state"]), tensors)
    except Exception as err:  # safetensors, JSON and missing-key errors alike
        raise ValueError(f"{path} is not a readable training checkpoint ({type(err).__name__}: {err}): it is corrupt "
                         f"or truncated; {advice}") from err
    return TrainingCheckpoint(path, state)


def config_differences(recorded: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """``{field: (checkpoint's value, this run's value)}`` for every field outside :data:`FREE_FIELDS` that
    differs (a field the checkpoint does not know counts as its default)."""
    current = cfg.to_dict()
    defaults = TrainConfig.__dataclass_fields__
    differ = {}
    for name in sorted(set(recorded) | set(current)):
        if name in FREE_FIELDS:
            continue
        if name not in current:
            differ[name] = (recorded[name], "<unknown to this version>")
            continue
        mine = current[name]
        theirs = recorded.get(name, defaults[name].default)
        if theirs != mine:
            differ[name] = (theirs, mine)
    return differ


def check_resumable(checkpoint: TrainingCheckpoint, cfg: TrainConfig, device_type: str) -> None:
    """Refuse (``ValueError`` naming the fields) a config or device type that would change the result."""
    differ = config_differences(checkpoint.state["config"], cfg)
    if differ:
        detail = "; ".join(f"--{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"--resume: this config differs from the checkpoint's in fields that change the result ({detail}). "
            f"Resume with the checkpoint's values (its config is in {checkpoint.path.parent / 'config.json'}) or start "
            f"again with --overwrite. Free to change on resume: {', '.join('--' + f.replace('_', '-') for f in FREE_FIELDS)}"
        )
    if checkpoint.state["device_type"] != device_type:
        raise ValueError(
            f"--resume: the checkpoint was trained on {checkpoint.state['device_type']!r}, this run uses {device_type!r}; "
            "another device type gives other numbers (kernels, random streams): resume on the same type of device"
        )


def open_for_resume(cfg: TrainConfig, output_dir, device_type: str) -> Optional[TrainingCheckpoint]:
    """At the start of a run, before any file is written: with ``--resume`` the checked checkpoint; without
    it ``None``, after removing a stale checkpoint if ``--overwrite`` (else refusing to start over it)."""
    path = checkpoint_path(output_dir)
    if cfg.resume:
        if not path.exists():
            finished = " (it holds metrics.json: the run has finished)" if (Path(output_dir) / "metrics.json").exists() else ""
            raise SystemExit(f"error: --resume: {output_dir} holds no {CHECKPOINT_FILE}{finished}; run without --resume to start it")
        checkpoint = read_checkpoint(output_dir)
        check_resumable(checkpoint, cfg, device_type)
        return checkpoint
    if path.exists():
        if not cfg.overwrite:
            raise SystemExit(f"error: {output_dir} holds an unfinished run with a checkpoint ({CHECKPOINT_FILE}): pass "
                             "--resume to continue it, or --overwrite to start again from step 0")
        path.unlink()
    return None


# --- Writing -----------------------------------------------------------------------------------------


def _constraint_name(constraint) -> str:
    for name, known in CONSTRAINTS.items():
        if constraint is known or (name == "real" and type(constraint) is type(constraints.real)):
            return name
    raise TypeError(f"cannot checkpoint a Pyro parameter with constraint {constraint!r}; known: {sorted(CONSTRAINTS)} "
                    "(add it to blob_pyro.resume.CONSTRAINTS)")


def _param_store_extras(model, guide) -> dict:
    """``{name: {"value": unconstrained tensor, "constraint": name}}`` for Pyro params outside the modules."""
    in_modules = {id(p) for module in (model, guide) for p in module.parameters()}
    store = pyro.get_param_store().get_state()
    return {name: {"value": value, "constraint": _constraint_name(store["constraints"][name])}
            for name, value in store["params"].items() if id(value) not in in_modules}


def _rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": list(cuda), "numpy": np.random.get_state(), "python": random.getstate()}


def _kl_counter(objective, step: int) -> dict:
    kl = objective.kl
    return {"cycle_length": kl.cycle_length, "position": step % kl.cycle_length, "next_pi": kl.pi(step)}


def save_checkpoint(output_dir, *, cfg: TrainConfig, step: int, model, guide, objective, stream, metrics: dict,
                    train_log_bytes: int, train_seconds: float, device_type: str, resumed_at: list) -> Path:
    """Write the training state after ``step`` finished steps atomically; returns the file's path."""
    path = checkpoint_path(output_dir)
    parts = {
        "model": {name: p for name, p in model.named_parameters() if p.requires_grad},
        "guide": guide.state_dict(),
        "param_store": _param_store_extras(model, guide),
        "objective": objective.state_dict(),
        "rng": _rng_state(),
    }
    state, tensors = {}, {}
    for name, part in parts.items():
        state[name], part_tensors = flatten(part, name)
        tensors.update(part_tensors)
    epoch, index = stream.position
    state.update(
        step=step, config=cfg.to_dict(), device_type=device_type, metrics=metrics, train_log_bytes=train_log_bytes,
        train_seconds=train_seconds, resumed_at=list(resumed_at), kl=_kl_counter(objective, step),
        data_position={"epoch": epoch, "index": index, "batches_per_epoch": stream.batches_per_epoch},
    )
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "state": json.dumps(state), "sha256": _digest(tensors)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # the data reaches the disk before the rename makes it the checkpoint
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _digest(tensors: dict) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor (catches damage to the data section)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- Restoring ---------------------------------------------------------------------------------------


def _copy_into(named: dict, saved: dict, what: str, path: Path) -> None:
    missing, unexpected = sorted(set(named) - set(saved)), sorted(set(saved) - set(named))
    wrong = sorted(k for k in set(named) & set(saved) if tuple(named[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: the {what} parameters do not match the model built from the config (missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}, other shape {wrong[:4]}); was the code changed?")
    with torch.no_grad():
        for name, tensor in named.items():
            tensor.copy_(saved[name])


def restore_training_state(checkpoint: TrainingCheckpoint, *, model, guide, objective, stream_batches_per_epoch: int,
                           device: torch.device) -> tuple[int, int]:
    """Put the checkpoint's parameters, Pyro param-store entries, optimiser/scheduler states and RNG states
    in place (call after the model, guide and objective are built, right before the next step). Returns the
    data position ``(epoch, index)`` of the next batch, after checking it and the KL counter against the step."""
    state, path, step = checkpoint.state, checkpoint.path, checkpoint.step
    kl = _kl_counter(objective, step)
    if kl != state["kl"]:
        raise ValueError(f"{path}: the KL schedule of this code gives {kl} at step {step}, the checkpoint recorded "
                         f"{state['kl']}: the schedule changed since it was written; start again with --overwrite")
    position = state["data_position"]
    if position["batches_per_epoch"] != stream_batches_per_epoch or \
            position["epoch"] * position["batches_per_epoch"] + position["index"] != step:
        raise ValueError(f"{path}: data position {position} does not match step {step} with "
                         f"{stream_batches_per_epoch} batches per epoch; the data changed since it was written")
    _copy_into({n: p for n, p in model.named_parameters() if p.requires_grad}, state["model"], "model", path)
    _copy_into(dict(guide.state_dict(keep_vars=True)), state["guide"], "guide", path)
    extras = state["param_store"]
    if extras:
        pyro.get_param_store().set_state({
            "params": {n: e["value"].to(device).requires_grad_(True) for n, e in extras.items()},
            "constraints": {n: CONSTRAINTS[e["constraint"]] for n, e in extras.items()},
        })
    objective.load_state_dict(state["objective"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return position["epoch"], position["index"]


def check_optimiser_state_restored(checkpoint: TrainingCheckpoint) -> None:
    """After the first resumed step: every optimiser state keyed by a Pyro parameter name must belong to a
    parameter that exists (Pyro's optimiser hands a saved state to a parameter when it first sees it)."""
    optim = checkpoint.state["objective"].get("optim")
    if optim is None:
        return
    store = pyro.get_param_store()
    orphans = sorted(name for name in optim if name not in store)
    if orphans:
        raise ValueError(f"{checkpoint.path}: optimiser states for parameters this model does not have: {orphans[:4]}")


def continue_train_log(log_path: Path, checkpoint: Optional[TrainingCheckpoint], log=print):
    """Open ``train_log.jsonl`` for the training loop: fresh, or (resuming) cut back to its length at the
    checkpoint, which drops lines written after it (they will be written again) and any half line."""
    if checkpoint is None:
        return open(log_path, "w")
    size = int(checkpoint.state["train_log_bytes"])
    found = log_path.stat().st_size if log_path.exists() else 0
    if found < size:
        log(f"warning: {log_path} has {found} bytes, the checkpoint recorded {size}: earlier log lines are lost")
    else:
        with open(log_path, "r+b") as f:
            f.truncate(size)
    return open(log_path, "a")
