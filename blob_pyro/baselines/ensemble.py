"""Deep ensemble (Lakshminarayanan et al. 2017): ``--ensemble-size`` runs of ``--guide`` with seeds
``seed, seed + 1000, ...`` (initialisation, batch order, sampling), predictions averaged as
PROBABILITIES (the mixture predictive), never as logits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blob_pyro.run_predictive import RunPredictive, base_run_dir, concatenate_draws

from blob_pyro.evaluation.metrics import classification_metrics

from blob_pyro.rundir import load_predictions, read_metrics

from . import register_method
from .common import primary_mode, train_base_run, write_baseline_run

__all__ = ["average_probabilities", "EnsemblePredictive", "load_predictive", "run"]

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


@dataclass
class EnsemblePredictive(RunPredictive):
    """The mixture of the members: every member's draws stacked (one draw for a point-estimate member, N
    for a sampling one), so the mean over all draws is the average of the members' probabilities and the
    spread between members is the epistemic part of the uncertainty decomposition. The members share one
    base network; each member's adapter and guide are loaded into it in turn."""

    members: list = field(default_factory=list)  # [(run_dir, TrainConfig)]

    def _use_member(self, k: int):
        import pyro

        from blob_pyro.assembly import build_guide
        from blob_pyro.checkpoint import load_adapter_and_guide

        member_dir, member_cfg = self.members[k]
        pyro.clear_param_store()  # guides of the same sites share Pyro parameter names
        guide = build_guide(member_cfg, self.model).to(self.device)
        load_adapter_and_guide(member_dir, self.model, guide)
        return guide

    def point_probs(self, model, batches):
        return None  # a mixture has no single point estimate

    def draws(self, model, batches, *, num_samples, seed, posterior_sites=()):
        from blob_pyro.evaluation.predictive import draw_predictive

        parts = []
        for k in range(len(self.members)):
            guide = self._use_member(k)
            point = getattr(guide, "point_estimate", not guide.scores_prior)
            parts.append(draw_predictive(model, guide, batches, num_samples=1 if point else num_samples,
                                         seed=seed + SEED_STRIDE * k, draws_per_pass=self.draws_per_pass))
        return concatenate_draws(parts)

    def modes(self, model, batches, draws):
        return {f"ensemble_{len(self.members)}": draws.probs.mean(0)}


def load_predictive(run_dir, cfg, *, device=None, dtype=None) -> EnsemblePredictive:
    """The ensemble run's :class:`EnsemblePredictive` (members ``member_<k>/``; member 0 may be ``--base-run``)."""
    from blob_pyro.config import TrainConfig

    from .common import load_run

    dirs = [base_run_dir(run_dir, cfg, f"member_{k}") for k in range(cfg.ensemble_size)]
    missing = [str(d) for d in dirs if not (Path(d) / "metrics.json").exists()]
    if missing:
        raise FileNotFoundError(f"ensemble {run_dir}: expected {cfg.ensemble_size} finished members, found none in {missing}; "
                                "rerun the ensemble (finished members are reused)")
    loaded = load_run(dirs[0], device=device, dtype=dtype)
    members = [(d, TrainConfig.load(Path(d) / "config.json")) for d in dirs]
    return EnsemblePredictive(
        method="ensemble", description=f"ensemble of {len(members)} {cfg.guide} runs", cfg=loaded.cfg, model=loaded.model,
        data=loaded.data, tokenizer=loaded.tokenizer, device=loaded.device, point_estimate=False, members=members,
    )
