"""Evaluate a trained model in every prediction mode and print the results table."""

from __future__ import annotations

import time

import torch

from .metrics import classification_metrics
from .predictive import posterior_mean_probs, sample_probs

__all__ = ["evaluate_modes", "results_table", "mode_name"]


def mode_name(num_samples: int) -> str:
    """``"mean"`` for the posterior-mean pass (N = 0), ``"samples_<N>"`` otherwise."""
    return "mean" if num_samples == 0 else f"samples_{num_samples}"


def evaluate_modes(model, guide, batches: list, labels: torch.Tensor, *, num_samples: int, seed: int, log=print,
                   draws_per_pass: int = 1) -> tuple[dict, dict]:
    """Metrics for the posterior mean (N = 0) and, if ``num_samples > 0``, the N-sample average of
    :func:`~blob_pyro.evaluation.predictive.sample_probs` (draw ``s`` seeded by ``draw_seed(seed, s)``, as
    ``python -m blob_pyro.evaluate`` draws them); ``draws_per_pass`` draws share one network pass.

    :returns: ``({mode: metrics}, {"mean": (n, K) probs, "samples": (N, n, K) probs or None})``.
    """
    results = {}
    n = int(labels.numel())
    start = time.perf_counter()
    mean_probs = posterior_mean_probs(model, guide, batches)
    seconds = time.perf_counter() - start
    results["mean"] = classification_metrics(mean_probs.numpy(), labels.numpy())
    log(f"evaluated N = 0 on {n} examples in {seconds:.1f} s ({n / seconds:.1f} examples/s)")
    draws = None
    if num_samples > 0:
        start = time.perf_counter()
        draws = sample_probs(model, guide, batches, num_samples=num_samples, seed=seed, draws_per_pass=draws_per_pass)
        seconds = time.perf_counter() - start
        results[mode_name(num_samples)] = classification_metrics(draws.mean(0).numpy(), labels.numpy())
        log(f"evaluated N = {num_samples} on {n} examples in {seconds:.1f} s ({n * num_samples / seconds:.1f} example-draws/s)")
    return results, {"mean": mean_probs, "samples": draws}


def results_table(metrics: dict, *, title: str = "") -> str:
    """A Markdown table: one row per prediction mode; ACC and ECE in %, ECE's bin count in the header."""
    bins = next(iter(metrics.values()))["ece_bins"] if metrics else 15
    lines = [title] if title else []
    lines += [f"| mode | n | ACC % | ECE % ({bins} bins) | NLL | Brier |", "|---|---|---|---|---|---|"]
    for mode, m in metrics.items():
        lines.append(f"| {mode} | {m['n_examples']} | {100 * m['acc']:.2f} | {m['ece']:.2f} | {m['nll']:.3f} | {m['brier']:.3f} |")
    return "\n".join(lines)
