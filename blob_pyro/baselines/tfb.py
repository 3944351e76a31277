"""TFB: training-free Bayesianization of a trained LoRA adapter (Shi et al. 2024, arXiv 2412.05723).

For each adapter with point estimates (B, A): thin SVD ``B = U diag(d) V^T``; rewrite the same update as
``B' = U diag(d)``, ``A' = V^T A`` (``B'A' = BA``) and put ``q(A') = N(A', diag(Omega^2))`` with
``Omega_ij = sigma / d_i``: the induced noise on the weight update ``B' (A - A')`` is then isotropic with
std ``sigma`` in the column space of B (the paper's "low-rank isotropic Gaussian"). One scalar sigma is
shared by every layer and chosen as the LARGEST value whose anchor-set NLL (MC predictive, common random
numbers: the same seeded draws of the noise for every sigma) exceeds the point estimate's by at most ``--tfb-nll-tolerance`` nats: a bisection in log sigma on
``[--tfb-min-std, --tfb-max-std]`` (:func:`largest_admissible_std`; 0 if even the minimum is too much). No gradient, no training.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from blob_pyro.evaluation.metrics import classification_metrics, negative_log_likelihood
from blob_pyro.evaluation.predictive import posterior_mean_probs, sample_probs

from blob_pyro.guides.fixed import FixedGaussianGuide
from blob_pyro.rundir import read_metrics

from . import register_method
from .common import load_run, train_base_run, write_baseline_run

__all__ = ["largest_admissible_std", "scaled", "tfb_posterior", "load_predictive", "run"]

MIN_SINGULAR_VALUE = 1e-6


def largest_admissible_std(
    degradation: Callable[[float], float], *, tolerance: float, upper: float, steps: int, lower: float = 1e-5
) -> float:
    """Bisection in ``log sigma`` for the largest ``sigma`` in ``[lower, upper]`` with
    ``degradation(sigma) <= tolerance``.

    Assumes ``degradation`` is non-decreasing (more noise, worse anchor NLL). Returns ``upper`` if even it
    is admissible, ``0.0`` (the point estimate) if even ``lower`` is not, else the lower end of the final
    bracket (always admissible). A log scale matters: the admissible std spans orders of magnitude with the
    singular values of B (small after a short run).
    """
    if not 0 < lower < upper:
        raise ValueError(f"TFB search needs 0 < lower ({lower}) < upper ({upper}); fix --tfb-min-std / --tfb-max-std")
    if degradation(upper) <= tolerance:
        return float(upper)
    if degradation(lower) > tolerance:
        return 0.0
    low, high = math.log(lower), math.log(upper)
    for _ in range(steps):
        mid = 0.5 * (low + high)
        if degradation(math.exp(mid)) <= tolerance:
            low = mid
        else:
            high = mid
    return math.exp(low)


def scaled(unit_scales: dict, sigma: float) -> dict:
    """``{site: unit_scale * sigma}``, floored at 1e-12 so that ``sigma = 0`` (the point estimate) stays a
    valid Normal."""
    return {k: (v * sigma).clamp_min(1e-12) for k, v in unit_scales.items()}


@torch.no_grad()
def tfb_posterior(model, guide, sigma: float) -> tuple[dict, dict]:
    """Rotate every adapter (B <- U diag(d), in place) and return ``(locs, scales)`` of ``q(A')``."""
    means = guide.posterior_mean()
    locs, scales = {}, {}
    for site, layer in model.adapters.items():
        B = layer.lora_B
        U, d, Vh = torch.linalg.svd(B.double(), full_matrices=False)  # B (out, r) = U (out, r) diag(d) Vh (r, r)
        B.copy_((U * d).to(B.dtype))
        locs[site] = (Vh @ means[site].double()).to(B.dtype)
        std = sigma / d.clamp_min(MIN_SINGULAR_VALUE)
        scales[site] = std.to(B.dtype).unsqueeze(-1).expand_as(locs[site]).clone().clamp_min(1e-12)
    return locs, scales


@register_method("tfb", help="training-free Bayesianization of a --guide map/mle run", compare={"tfb": ["--guide", "mle"]},
                 base_method="mle")
def run(cfg) -> dict:
    start = time.perf_counter()
    base = train_base_run(cfg, "base")
    loaded = load_run(base)
    model, data = loaded.model, loaded.data
    from blob_pyro.assembly import batches as make_batches

    anchor_size = min(cfg.tfb_anchor_size, len(data.train))
    anchor = _subset(data.train, anchor_size)
    anchor_batches = make_batches(data, anchor, batch_size=cfg.eval_batch_size, device=loaded.device)
    anchor_labels = anchor.labels.numpy()
    samples = max(cfg.eval_samples, 1)
    search_samples = cfg.tfb_search_samples or samples
    locs, unit_scales = tfb_posterior(model, loaded.guide, 1.0)  # scales are linear in sigma
    base_nll = negative_log_likelihood(posterior_mean_probs(model, FixedGaussianGuide(model, locs, unit_scales), anchor_batches).numpy(), anchor_labels)
    trace = []

    def degradation(sigma: float) -> float:  # the same seed: common random numbers, the same noise for every sigma
        guide = FixedGaussianGuide(model, locs, scaled(unit_scales, sigma))
        probs = sample_probs(model, guide, anchor_batches, num_samples=search_samples, seed=cfg.seed).mean(0).numpy()
        value = negative_log_likelihood(probs, anchor_labels) - base_nll
        trace.append({"sigma": sigma, "nll_increase": value})
        return value

    sigma = largest_admissible_std(degradation, tolerance=cfg.tfb_nll_tolerance, upper=cfg.tfb_max_std,
                                   lower=cfg.tfb_min_std, steps=cfg.tfb_search_steps)
    if sigma == 0.0:
        print(f"TFB: even sigma = {cfg.tfb_min_std:g} raises the anchor NLL by more than {cfg.tfb_nll_tolerance}: "
              "the posterior is the point estimate (lower --tfb-min-std or raise --tfb-nll-tolerance)")
    guide = FixedGaussianGuide(model, locs, scaled(unit_scales, sigma))
    val_batches = loaded.validation_batches()
    labels = data.validation.labels
    draws = sample_probs(model, guide, val_batches, num_samples=samples, seed=cfg.seed)  # as evaluate draws them
    base_metrics = read_metrics(base)
    name = f"samples_{samples}"
    metrics = {k: base_metrics[k] for k in ("zero_shot", "mean") if k in base_metrics}
    metrics[name] = classification_metrics(draws.mean(0).numpy(), labels.numpy())
    info = {"method": "tfb", "base_run": "base", "sigma": sigma, "anchor_size": anchor_size, "anchor_nll": base_nll,
            "search": trace, "search_samples": search_samples, "num_samples": samples, "wall_seconds": time.perf_counter() - start}
    print(f"TFB: sigma = {sigma:.4g} (anchor NLL {base_nll:.4f}, tolerance {cfg.tfb_nll_tolerance})")
    return write_baseline_run(cfg, metrics, {name: draws.mean(0)}, labels, info)


def load_predictive(run_dir, cfg, *, device=None, dtype=None):
    """The run's :class:`~blob_pyro.run_predictive.RunPredictive`: its base run rotated as in :func:`tfb_posterior`
    with the ``sigma`` its search chose (``run.json``; deterministic, no search again), draws from ``q(A')``."""
    import json
    from pathlib import Path

    from blob_pyro.run_predictive import GuidePredictive, base_run_dir

    info = json.loads((Path(run_dir) / "run.json").read_text())
    sigma = float(info["sigma"])
    loaded = load_run(base_run_dir(run_dir, cfg), device=device, dtype=dtype)
    locs, unit_scales = tfb_posterior(loaded.model, loaded.guide, 1.0)
    guide = FixedGaussianGuide(loaded.model, locs, scaled(unit_scales, sigma))
    return GuidePredictive(
        method="tfb", description=f"TFB sigma = {sigma:.3g}", cfg=loaded.cfg, model=loaded.model, data=loaded.data,
        tokenizer=loaded.tokenizer, device=loaded.device, point_estimate=sigma == 0.0, guide=guide,
    )


def _subset(encoded, size: int):
    """The first ``size`` examples of an ``EncodedSplit`` (the training order is already a seeded shuffle)."""
    return encoded.first(size)
