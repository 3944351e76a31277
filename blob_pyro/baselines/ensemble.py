"""Deep ensemble (Lakshminarayanan et al. 2017): ``--ensemble-size`` runs of ``--guide`` with seeds
``seed, seed + 1000, ...`` (initialisation, batch order, sampling), predictions averaged as
PROBABILITIES (the mixture predictive), never as logits."""

from __future__ import annotations

import time

import numpy as np

from blob_pyro.evaluation.metrics import classification_metrics

from . import register_method
from .common import load_predictions, primary_mode, read_metrics, train_base_run, write_baseline_run

__all__ = ["average_probabilities", "run"]

SEED_STRIDE = 1000


def average_probabilities(member_probs) -> np.ndarray:
    """The ensemble predictive: mean over members of ``(n, K)`` probabilities -> ``(n, K)``.

    Averaging logits instead would give a sharper, differently calibrated predictive (a product of
    experts, not the mixture), so the inputs must already be probabilities: rows summing to 1.
    """
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])
    if stacked.ndim != 3:
        raise ValueError(f"expected a list of (n, K) probability arrays, got shape {stacked.shape}")
    if not np.allclose(stacked.sum(-1), 1.0, atol=1e-4) or (stacked < 0).any():
        raise ValueError("ensemble members must give probabilities (rows >= 0 summing to 1), not logits: apply softmax first")
    return stacked.mean(0)


@register_method("ensemble", help="--ensemble-size runs of --guide with seeds seed, seed+1000, ...; probabilities averaged",
                 compare={"ensemble": ["--guide", "mle"]}, base_method="mle")
def run(cfg) -> dict:
    start = time.perf_counter()
    members, member_metrics = [], []
    for k in range(cfg.ensemble_size):
        run_dir = train_base_run(cfg, f"member_{k}", seed=cfg.seed + SEED_STRIDE * k)
        probs, labels = load_predictions(run_dir)
        metrics = read_metrics(run_dir)
        mode = primary_mode(metrics)
        members.append(probs[mode])
        member_metrics.append(metrics[mode])
    ensemble = average_probabilities(members)
    name = f"ensemble_{cfg.ensemble_size}"
    metrics = {}
    if "zero_shot" in read_metrics(run_dir):
        metrics["zero_shot"] = read_metrics(run_dir)["zero_shot"]
    metrics[name] = classification_metrics(ensemble, labels)
    for k, m in enumerate(member_metrics):
        metrics[f"member_{k}"] = m
    info = {"method": "ensemble", "members": [f"member_{k}" for k in range(cfg.ensemble_size)],
            "wall_seconds": time.perf_counter() - start}
    return write_baseline_run(cfg, metrics, {name: ensemble}, labels, info)
