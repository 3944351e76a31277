"""Posterior predictive class probabilities.

* ``num_samples = N > 0``: ``pyro.infer.Predictive`` on the guide draws every latent site N times; the
  model, conditioned on draw s, is then traced once per batch, so each draw is one coherent model over the
  whole evaluation set and the cost is exactly N network passes per batch (``Predictive`` on the model
  adds two shape-probing network passes to every call: 12 passes for N = 10). Sequential:
  ``Predictive(parallel=True)`` fails on transformers models (PYRO_NOTES.md).
* ``draws_per_pass = D > 1``: D draws share one network pass, stacked along the batch axis (the batch is
  repeated D times and every adapter applies draw s to copy s), so N draws cost ceil(N / D) passes of
  D times the rows: on a GPU that is far cheaper than N small passes. Same draws, same probabilities
  as the loop (up to float rounding); memory grows with D.
* ``num_samples = 0``: one pass with every A at the guide's posterior mean ("BLoB N = 0").
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch
from pyro import poutine
from pyro.infer import Predictive
from tqdm.auto import tqdm

from blob_pyro.models.bayesian_model import extra_batch_inputs

__all__ = ["predict_probs", "posterior_mean_logits", "posterior_mean_probs", "sample_probs", "guide_draws"]


def guide_draws(guide, batch: dict, *, num_samples: int) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` joint draws of every guide sample site, ``[{site: value}]``, drawn by
    ``pyro.infer.Predictive`` on the guide (``batch`` gives the guide its model arguments)."""
    draws = Predictive(guide, num_samples=num_samples)(batch["input_ids"], batch["attention_mask"], **extra_batch_inputs(batch))
    return [{site: value[s] for site, value in draws.items()} for s in range(num_samples)]


@torch.no_grad()
def sample_probs(model, guide, batches: Iterable[dict], *, num_samples: int, draws_per_pass: int = 1) -> torch.Tensor:
    """Class probabilities per posterior draw: ``(num_samples, n, K)``, rows in batch order. Draw s of
    every site is the same for all batches.

    :param draws_per_pass: how many draws share one network pass (stacked along the batch axis);
        1 = one pass per draw (the Pyro-traced loop). The draws are the same either way.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 for sampling, got {num_samples}")
    if not (isinstance(draws_per_pass, int) and draws_per_pass >= 1):
        raise ValueError(f"draws_per_pass must be a positive integer (1 = one network pass per draw), got {draws_per_pass!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("no evaluation batches: the split has no examples to evaluate")
    draws = guide_draws(guide, batches[0], num_samples=num_samples)
    if draws_per_pass > 1:
        return _stacked_sample_probs(model, draws, batches, draws_per_pass=draws_per_pass)
    models = [poutine.trace(poutine.condition(model, data=draw)) for draw in draws]
    chunks = []
    for b in tqdm(batches, desc=f"predictive N={num_samples}", file=sys.stderr, leave=False, disable=len(batches) < 2):
        per_draw = []
        for conditioned in models:
            probs = conditioned.get_trace(b["input_ids"], b["attention_mask"], **extra_batch_inputs(b)).nodes["probs"]["value"]
            per_draw.append(probs.reshape(probs.shape[-2:]).float().cpu())
        chunks.append(torch.stack(per_draw))
    return torch.cat(chunks, dim=1)


def _repeat_rows(batch: dict, times: int) -> dict:
    """Every batch tensor repeated ``times`` along axis 0 (copy s = rows ``[s * b, (s + 1) * b)``)."""
    return {key: value.repeat(times, *([1] * (value.dim() - 1))) for key, value in batch.items()}


def _stacked_sample_probs(model, draws: list[dict], batches: list[dict], *, draws_per_pass: int) -> torch.Tensor:
    """:func:`sample_probs` with ``draws_per_pass`` draws stacked along the batch axis: ``(N, n, K)``."""
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
    return torch.cat(chunks, dim=1)


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


def predict_probs(model, guide, batches: Iterable[dict], *, num_samples: int, draws_per_pass: int = 1) -> torch.Tensor:
    """Averaged predictive ``(n, K)``: the posterior mean pass if ``num_samples == 0``, else the mean of N draws."""
    batches = list(batches)
    if num_samples == 0:
        return posterior_mean_probs(model, guide, batches)
    return sample_probs(model, guide, batches, num_samples=num_samples, draws_per_pass=draws_per_pass).mean(0)
