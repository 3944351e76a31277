"""Posterior predictive class probabilities with ``pyro.infer.Predictive``.

* ``num_samples = N > 0``: N draws of every A from the guide, one full forward pass each (sequential:
  ``Predictive(parallel=True)`` fails on transformers models, PYRO_NOTES.md), returning the
  deterministic ``"probs"`` site only.
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

__all__ = ["predict_probs", "posterior_mean_probs", "sample_probs"]


@torch.no_grad()
def sample_probs(model, guide, batches: Iterable[dict], *, num_samples: int) -> torch.Tensor:
    """Class probabilities per posterior draw: ``(num_samples, n, K)``, rows in batch order."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 for sampling, got {num_samples}")
    predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=["probs"])
    batches = list(batches)
    chunks = []
    for b in tqdm(batches, desc=f"predictive N={num_samples}", file=sys.stderr, leave=False, disable=len(batches) < 2):
        probs = predictive(b["input_ids"], b["attention_mask"], **extra_batch_inputs(b))["probs"]
        chunks.append(probs.reshape(num_samples, *probs.shape[-2:]).float().cpu())  # drop Predictive's extra dims
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def posterior_mean_probs(model, guide, batches: Iterable[dict]) -> torch.Tensor:
    """Class probabilities with every A at its posterior mean: ``(n, K)``."""
    means = guide.posterior_mean()
    batches = list(batches)
    chunks = []
    for b in tqdm(batches, desc="posterior mean", file=sys.stderr, leave=False, disable=len(batches) < 2):
        with poutine.block(), poutine.condition(data=means):
            logits = model.class_logits(b["input_ids"], b["attention_mask"], **extra_batch_inputs(b))
        chunks.append(torch.softmax(logits, -1).float().cpu())
    return torch.cat(chunks, dim=0)


def predict_probs(model, guide, batches: Iterable[dict], *, num_samples: int) -> torch.Tensor:
    """Averaged predictive ``(n, K)``: the posterior mean pass if ``num_samples == 0``, else the mean of N draws."""
    batches = list(batches)
    if num_samples == 0:
        return posterior_mean_probs(model, guide, batches)
    return sample_probs(model, guide, batches, num_samples=num_samples).mean(0)
