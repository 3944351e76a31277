"""Post-hoc temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", section 4.2).

One scalar ``T > 0`` divides the class logits of a finished run's posterior mean (BLoB's N = 0):
``p = softmax(logits / T)``. ``T`` minimises the NLL of the ``--num-calibration`` examples that were
carved out of the TRAINING pool before the base run trained (``split.json`` "calibration"), never of
the reported validation split. ``T`` does not change the arg max, so accuracy is the base run's.

Optimised over ``log T`` (unconstrained, from ``T = 1``) by L-BFGS in float64. The NLL is convex in
``1 / T`` (a log-sum-exp of functions linear in it), hence unimodal in ``log T``: the stationary point is
the global minimiser, and clipping to ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` gives the minimiser over
that interval. On a separable calibration set the NLL keeps falling as ``T -> 0``; L-BFGS then stops
where its gradient (and the NLL) is already ~0, a small T.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

from dataclasses import dataclass

import torch
from torch import nn

from blob_pyro.run_predictive import GuidePredictive

from blob_pyro.evaluation.metrics import classification_metrics

from blob_pyro.rundir import read_metrics

from . import register_method
from .common import load_run, train_base_run, write_baseline_run

__all__ = [
    "MIN_TEMPERATURE", "MAX_TEMPERATURE", "fit_temperature", "temperature_nll", "TemperatureScaledHead",
    "require_calibration_split", "temperature_of_run", "load_predictive", "run",
]

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2


def temperature_nll(logits: torch.Tensor, labels: torch.Tensor, temperature) -> torch.Tensor:
    """Mean NLL of ``softmax(logits / T)``: ``logits`` ``(n, K)``, ``labels`` ``(n,)``, ``T`` a scalar (tensor)."""
    return torch.nn.functional.cross_entropy(logits / temperature, labels)


def fit_temperature(logits, labels, *, max_iter: int = 100) -> float:
    """The ``T`` in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` minimising :func:`temperature_nll` (Guo et al. 2017).

    :param logits: ``(n, K)`` class logits (any per-row shift, e.g. log-probabilities, gives the same T).
    :param labels: ``(n,)`` class indices.
    """
    logits = torch.as_tensor(logits).detach().to(torch.float64)
    labels = torch.as_tensor(labels).detach().long()
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (n, K) and labels (n,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("temperature scaling needs finite logits; got inf or nan (pass logits, not log of 0 probabilities)")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = temperature_nll(logits, labels, log_t.exp())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    log_t = float(log_t.detach())
    if not math.isfinite(log_t):  # a separable set can drive log T to -inf: the infimum is at the lower bound
        return MIN_TEMPERATURE
    return float(min(max(math.exp(log_t), MIN_TEMPERATURE), MAX_TEMPERATURE))


class TemperatureScaledHead(nn.Module):
    """A likelihood head whose class logits ``(batch, K)`` are the wrapped head's divided by ``temperature``."""

    def __init__(self, head: nn.Module, temperature: float):
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
        self.head = head
        self.temperature = float(temperature)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, network, input_ids, attention_mask, **head_inputs) -> torch.Tensor:
        return self.head(network, input_ids, attention_mask, **head_inputs) / self.temperature


def require_calibration_split(run_dir) -> int:
    """The number of calibration examples in ``run_dir/split.json``; a ``ValueError`` naming the flag if none."""
    path = Path(run_dir) / "split.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    count = len(recorded.get("calibration", []))
    if count == 0:
        raise ValueError(
            f"--base-run {run_dir}: its split.json has no calibration examples (it trained on its whole training pool), "
            "and T must not be fitted on the validation split; retrain the base run with --num-calibration K "
            "(e.g. 64) and pass the same --num-calibration K here"
        )
    return count


def temperature_of_run(run_dir) -> Optional[tuple[Path, float]]:
    """``(base run directory, T)`` if ``run_dir`` is a finished ``--method temperature`` run, else ``None``.
    ``run.json`` records the base run relative to ``run_dir``, so a moved results tree still resolves."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if config.get("method") != "temperature":
        return None
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path} is missing: {run_dir} is an unfinished --method temperature run; rerun it")
    info = json.loads(info_path.read_text())
    return run_dir / info["base_run"], float(info["temperature"])


@register_method("temperature", help="post-hoc temperature scaling of the posterior-mean logits of any run, one T fitted by "
                 "NLL on its --num-calibration examples", compare={"temperature": ["--guide", "mle"]}, base_method="mle")
def run(cfg) -> dict:
    start = time.perf_counter()
    if cfg.base_run:
        require_calibration_split(cfg.base_run)  # before anything else: the likely mistake, with its fix
    base = train_base_run(cfg, "base")
    loaded = load_run(base)
    model, data = loaded.model, loaded.data
    from blob_pyro.assembly import batches
    from blob_pyro.evaluation.predictive import posterior_mean_logits

    calibration = data.calibration
    if calibration is None:
        require_calibration_split(base)  # raises
    cal_logits = posterior_mean_logits(model, loaded.guide, batches(data, calibration, batch_size=cfg.eval_batch_size, device=loaded.device))
    cal_labels = calibration.labels
    temperature = fit_temperature(cal_logits, cal_labels)
    at_bound = temperature in (MIN_TEMPERATURE, MAX_TEMPERATURE)
    if at_bound:
        print(f"temperature: T hit the bound {temperature:g} (a separable or constant calibration set); "
              "more --num-calibration examples give a better estimate")
    val_logits = posterior_mean_logits(model, loaded.guide, loaded.validation_batches())
    labels = data.validation.labels
    probs = torch.softmax(val_logits.double() / temperature, -1)
    base_metrics = read_metrics(base)
    metrics = {k: base_metrics[k] for k in ("zero_shot",) if k in base_metrics}
    metrics["mean"] = {**classification_metrics(probs.numpy(), labels.numpy()), "temperature": temperature}
    nll = lambda t: float(temperature_nll(cal_logits.double(), cal_labels, t))  # noqa: E731
    info = {
        "method": "temperature", "base_run": os.path.relpath(Path(base).resolve(), Path(cfg.output_dir).resolve()), "temperature": temperature,
        "temperature_at_bound": at_bound, "num_calibration": len(cal_labels), "num_train": len(data.train),
        "calibration_nll_before": nll(1.0), "calibration_nll_after": nll(temperature),
        "base_mean": base_metrics.get("mean"), "wall_seconds": time.perf_counter() - start,
    }
    print(f"temperature scaling: T = {temperature:.4g} fitted on {len(cal_labels)} calibration examples "
          f"(calibration NLL {info['calibration_nll_before']:.4f} -> {info['calibration_nll_after']:.4f})")
    return write_baseline_run(cfg, metrics, {"mean": probs.float()}, labels, info)


def load_predictive(run_dir, cfg, *, device=None, dtype=None):
    """The run's :class:`~blob_pyro.run_predictive.RunPredictive`: its base run's guide (posterior mean and
    draws, as the base run's) with every class logit divided by the fitted ``T`` (also on other tasks' heads)."""
    from blob_pyro.run_predictive import load_svi_run

    base_dir, temperature = temperature_of_run(run_dir)
    loaded = load_svi_run(base_dir, device=device, dtype=dtype)
    loaded.model.head = TemperatureScaledHead(loaded.model.head, temperature)
    guide = loaded.guide
    return TemperaturePredictive(
        method="temperature", description=f"temperature-scaled {loaded.cfg.guide} run (T = {temperature:.4g})", cfg=loaded.cfg,
        model=loaded.model, data=loaded.data, tokenizer=loaded.tokenizer, device=loaded.device, guide=guide,
        point_estimate=getattr(guide, "point_estimate", not guide.scores_prior), temperature=temperature, base_dir=Path(base_dir),
    )



@dataclass
class TemperaturePredictive(GuidePredictive):
    """:class:`~blob_pyro.run_predictive.GuidePredictive` whose every head divides its logits by ``temperature``."""

    temperature: float = 1.0
    base_dir: Optional[Path] = None

    def model_for(self, task):
        model = super().model_for(task)
        if task is not self.data.task:
            model.head = TemperatureScaledHead(model.head, self.temperature)
        return model
