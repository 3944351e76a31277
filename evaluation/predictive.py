"""Posterior predictive class probabilities: the one sampler that train, evaluate and the baselines share.

* :func:`draw_predictive` (``num_samples = S >= 1``): draw ``s`` seeds the RNG with :func:`draw_seed`
  ``(seed, s)``, draws every latent site once from the guide and runs the model conditioned on that draw on
  every evaluation batch, so each draw is one coherent network over the whole evaluation set, the cost is
  exactly S network passes per batch, and two calls with the same seed (one per task, or ``train`` and
  ``evaluate`` on the same run) use the same S networks. Sequential: ``Predictive(parallel=True)`` fails on
  transformers models, which do not broadcast over a leading sample dimension.
* ``draws_per_pass = D > 1``: D draws share one network pass, stacked along the batch axis (the batch is
  repeated D times and every adapter applies draw s to copy s), so S draws cost ceil(S / D) passes of
  D times the rows: on a GPU that is far cheaper than S small passes. Same draws, same probabilities
  as the loop (up to float rounding); memory grows with D.
* :func:`sample_probs`: the ``(S, n, K)`` probabilities of :func:`draw_predictive` as a tensor.
* :func:`posterior_mean_probs` (``num_samples = 0``): one pass with every A at the guide's posterior mean
  ("BLoB N = 0").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from pyro import poutine
from tqdm.auto import tqdm

from blob_pyro.models.bayesian_model import extra_batch_inputs

__all__ = [
    "PredictiveDraws", "draw_seed", "guide_draws", "guide_sample_sites", "draw_predictive", "sample_probs",
    "posterior_mean_logits", "posterior_mean_probs", "predict_probs",
]


@dataclass
class PredictiveDraws:
    """What :func:`draw_predictive` returns; numpy arrays on the CPU.

    Attributes:
        probs: ``(S, n, K)`` float32 class probabilities of each draw.
        sampled_labels: ``(S, n)`` int64 labels sampled from each draw's categorical likelihood.
        posterior: ``{site: (S, rank, in_features)}`` float32 draws of A, for the sites asked for.
        seeds: ``(S,)`` the seed of each draw.
    """

    probs: np.ndarray
    sampled_labels: np.ndarray
    posterior: dict[str, np.ndarray] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)

    @property
    def num_draws(self) -> int:
        return int(self.probs.shape[0])


def draw_seed(seed: int, draw: int) -> int:
    """The seed of draw ``draw`` (the same for every task evaluated with the same ``seed``)."""
    return (int(seed) * 1_000_003 + int(draw) * 7_919 + 17) % (2**63 - 1)


def _guide_draw(guide, batch: dict) -> dict[str, torch.Tensor]:
    trace = poutine.trace(guide).get_trace(batch["input_ids"], batch["attention_mask"], **extra_batch_inputs(batch))
    return {name: site["value"].detach() for name, site in trace.nodes.items() if site["type"] == "sample"}


def _fork_devices(batch: dict) -> list:
    return [batch["input_ids"].device] if batch["input_ids"].is_cuda else []


def guide_sample_sites(guide, batch: dict) -> list[str]:
    """Names of the guide's sample sites (one trace on ``batch``; the RNG state is restored)."""
    with torch.random.fork_rng(devices=_fork_devices(batch)), torch.no_grad():
        return list(_guide_draw(guide, batch))


@torch.no_grad()
def guide_draws(guide, batch: dict, *, num_samples: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` joint draws of every guide sample site, ``[{site: value}]``; draw ``s`` is seeded by
    :func:`draw_seed` ``(seed, s)`` (``batch`` gives the guide its model arguments). The global RNG state
    is restored afterwards."""
    draws = []
    for s in range(num_samples):
        with torch.random.fork_rng(devices=_fork_devices(batch)):
            torch.manual_seed(draw_seed(seed, s))
            draws.append(_guide_draw(guide, batch))
    return draws


def _check_arguments(batches: list, num_samples, draws_per_pass) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(draws_per_pass, bool) or not isinstance(draws_per_pass, int) or draws_per_pass < 1:
        raise ValueError(f"draws_per_pass must be a positive integer (1 = one network pass per draw), got {draws_per_pass!r}")
    if not batches:
        raise ValueError("no evaluation batches: the task has no examples to evaluate")


@torch.no_grad()
def draw_predictive(
    model,
    guide,
    batches: Iterable[dict],
    *,
    num_samples: int,
    seed: int = 0,
    posterior_sites: Sequence[str] = (),
    draws_per_pass: int = 1,
) -> PredictiveDraws:
    """Posterior predictive draws of the deterministic ``"probs"`` site and sampled labels ``"obs"``.

    For each draw ``s``: seed the RNG with :func:`draw_seed` ``(seed, s)``, draw every A once from the
    guide, then run the model conditioned on that draw (one ``Predictive`` sample, traced directly, without
    the two shape-probing model passes ``Predictive`` adds to every call) on every batch. Randomness inside
    the model (MC dropout masks, the sampled labels) comes from the same seeded stream. The global RNG state
    is restored afterwards.

    Args:
        model: a :class:`~blob_pyro.models.BayesianLoRAModel` (in eval mode).
        guide: a guide over its latent sites, e.g. ``BLoBGuide``.
        batches: evaluation batches (``input_ids``, ``attention_mask`` ``(b, T)``, and any extra head
            inputs such as ``continuation_mask``) in a fixed order.
        num_samples: S >= 1.
        seed: base seed of the draws.
        posterior_sites: A sites whose draws to keep (memory: S * rank * in_features floats per site).
        draws_per_pass: D draws share one network pass, stacked along the batch axis (same draws and
            probabilities; the labels are then sampled from each draw's probabilities in a separate
            seeded stream, so they differ from the loop's, with the same distribution).

    Returns:
        :class:`PredictiveDraws` with ``probs`` ``(S, n, K)``, ``sampled_labels`` ``(S, n)`` and
        ``posterior`` ``{site: (S, rank, in_features)}``, rows in batch order.
    """
    batches = list(batches)
    _check_arguments(batches, num_samples, draws_per_pass)
    if draws_per_pass > 1:
        return _stacked_draw_predictive(model, guide, batches, num_samples=num_samples, seed=seed,
                                        posterior_sites=posterior_sites, draws_per_pass=draws_per_pass)
    probs, labels, seeds = [], [], []
    posterior: dict[str, list[np.ndarray]] = {site: [] for site in posterior_sites}
    for s in tqdm(range(num_samples), desc="posterior draws", file=sys.stderr, leave=False):
        seeds.append(draw_seed(seed, s))
        with torch.random.fork_rng(devices=_fork_devices(batches[0])):
            torch.manual_seed(seeds[-1])
            draw = _guide_draw(guide, batches[0])
            _keep_posterior(posterior, draw)
            conditioned = poutine.trace(poutine.condition(model, data=draw))
            draw_probs, draw_labels = [], []
            for b in batches:
                nodes = conditioned.get_trace(b["input_ids"], b["attention_mask"], **extra_batch_inputs(b)).nodes
                draw_probs.append(nodes["probs"]["value"].reshape(*nodes["probs"]["value"].shape[-2:]).float().cpu())
                draw_labels.append(nodes["obs"]["value"].reshape(-1).long().cpu())
        probs.append(torch.cat(draw_probs).numpy())
        labels.append(torch.cat(draw_labels).numpy())
    return PredictiveDraws(probs=np.stack(probs), sampled_labels=np.stack(labels),
                           posterior={site: np.stack(values) for site, values in posterior.items()}, seeds=seeds)


def _keep_posterior(posterior: dict[str, list], draw: dict[str, torch.Tensor]) -> None:
    """Append the draw of every site in ``posterior`` (a ``ValueError`` naming sites the guide lacks)."""
    missing = [site for site in posterior if site not in draw]
    if missing:
        raise ValueError(f"the guide has no sample sites {missing[:3]}; its sites are {sorted(draw)[:3]} ...")
    for site, values in posterior.items():
        values.append(draw[site].float().cpu().numpy())


def _repeat_rows(batch: dict, times: int) -> dict:
    """Every batch tensor repeated ``times`` along axis 0 (copy s = rows ``[s * b, (s + 1) * b)``)."""
    return {key: value.repeat(times, *([1] * (value.dim() - 1))) for key, value in batch.items()}


def _stacked_draw_predictive(model, guide, batches: list[dict], *, num_samples: int, seed: int,
                             posterior_sites: Sequence[str], draws_per_pass: int) -> PredictiveDraws:
    """:func:`draw_predictive` with ``draws_per_pass`` draws stacked along the batch axis."""
    draws = guide_draws(guide, batches[0], num_samples=num_samples, seed=seed)
    posterior: dict[str, list[np.ndarray]] = {site: [] for site in posterior_sites}
    for draw in draws:
        _keep_posterior(posterior, draw)
    groups = [draws[i:i + draws_per_pass] for i in range(0, len(draws), draws_per_pass)]
    stacked = [{site: torch.stack([d[site] for d in group]) for site in group[0]} for group in groups]  # {site: (D, ...)}
    chunks = []
    for b in tqdm(batches, desc=f"predictive N={len(draws)}, {draws_per_pass} per pass", file=sys.stderr, leave=False,
                  disable=len(batches) < 2):
        per_group = []
        for group_draws in stacked:
            D = next(iter(group_draws.values())).shape[0]
            repeated = _repeat_rows(b, D)
            with poutine.block(), poutine.condition(data=group_draws):
                logits = model.class_logits(repeated["input_ids"], repeated["attention_mask"], **extra_batch_inputs(repeated))
            per_group.append(torch.softmax(logits.float(), -1).reshape(D, -1, logits.shape[-1]).cpu())
        chunks.append(torch.cat(per_group))
    probs = torch.cat(chunks, dim=1)  # (S, n, K)
    seeds = [draw_seed(seed, s) for s in range(num_samples)]
    labels = [torch.multinomial(p.double(), 1, generator=torch.Generator().manual_seed(draw_seed(s_seed, 1))).squeeze(-1)
              for p, s_seed in zip(probs, seeds)]
    return PredictiveDraws(probs=probs.numpy(), sampled_labels=torch.stack(labels).numpy(),
                           posterior={site: np.stack(values) for site, values in posterior.items()}, seeds=seeds)


@torch.no_grad()
def sample_probs(model, guide, batches: Iterable[dict], *, num_samples: int, seed: int = 0, draws_per_pass: int = 1) -> torch.Tensor:
    """Class probabilities per posterior draw: ``(num_samples, n, K)``, rows in batch order; the draws of
    :func:`draw_predictive` (draw ``s`` seeded by ``draw_seed(seed, s)``, the same for all batches).

    :param draws_per_pass: how many draws share one network pass (stacked along the batch axis);
        1 = one pass per draw (the Pyro-traced loop). The draws are the same either way.
    """
    return torch.from_numpy(draw_predictive(model, guide, batches, num_samples=num_samples, seed=seed,
                                            draws_per_pass=draws_per_pass).probs)


@torch.no_grad()
def posterior_mean_logits(model, guide, batches: Iterable[dict]) -> torch.Tensor:
    """Class logits with every A at its posterior mean: ``(n, K)`` float32 on the CPU, rows in batch order."""
    means = guide.posterior_mean()
    batches = list(batches)
    chunks = []
    for b in tqdm(batches, desc="posterior mean", file=sys.stderr, leave=False, disable=len(batches) < 2):
        with poutine.block(), poutine.condition(data=means):
            logits = model.class_logits(b["input_ids"], b["attention_mask"], **extra_batch_inputs(b))
        chunks.append(logits.float().cpu())
    return torch.cat(chunks, dim=0)


def posterior_mean_probs(model, guide, batches: Iterable[dict]) -> torch.Tensor:
    """Class probabilities with every A at its posterior mean: ``(n, K)``."""
    return torch.softmax(posterior_mean_logits(model, guide, batches), -1)


def predict_probs(model, guide, batches: Iterable[dict], *, num_samples: int, seed: int = 0, draws_per_pass: int = 1) -> torch.Tensor:
    """Averaged predictive ``(n, K)``: the posterior mean pass if ``num_samples == 0``, else the mean of N draws."""
    batches = list(batches)
    if num_samples == 0:
        return posterior_mean_probs(model, guide, batches)
    return sample_probs(model, guide, batches, num_samples=num_samples, seed=seed, draws_per_pass=draws_per_pass).mean(0)
