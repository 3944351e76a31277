"""Per-example uncertainty decomposition, per-task summaries, OOD detection and selective prediction.

Built on :mod:`blob_pyro.evaluation.metrics` (entropies, AUROC, AUPR, AURC). With ``sample_probs`` of
shape ``(S, n, K)``:

* total uncertainty = predictive entropy ``H[mean_s p_s]``;
* aleatoric = expected entropy ``mean_s H[p_s]`` (noise the model sees in the label);
* epistemic = mutual information = total - aleatoric (disagreement between posterior draws; 0 for a
  point estimate or when every draw agrees).

All entropies are in nats. Entropy is bounded by ``log K``, so comparing tasks with different numbers
of classes (social_iqa K = 3 against strategyqa K = 2) by raw entropy is biased: the ``*_normalized``
scores divide by ``log K`` and put every task on [0, 1].
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np

from .metrics import (
    _check_labels, _check_sample_probs, accuracy_coverage_curve, aupr, auroc, aurc, classification_metrics,
    expected_entropy, mutual_information, predictive_entropy,
)

__all__ = [
    "OOD_SCORES", "uncertainty_decomposition", "task_summary", "ood_scores", "ood_detection", "selective_prediction",
    "per_example_table", "summarize_tasks",
]


def uncertainty_decomposition(sample_probs) -> dict[str, np.ndarray]:
    """Per-example uncertainty from ``(S, n, K)`` draws (an ``(n, K)`` array is one draw).

    Returns ``(n,)`` float64 arrays: ``total`` (predictive entropy), ``aleatoric`` (expected entropy),
    ``epistemic`` (mutual information), ``confidence`` (top probability of the averaged predictive)
    and int64 ``prediction`` (its argmax). ``total = aleatoric + epistemic`` up to rounding.
    """
    p = _check_sample_probs(sample_probs)
    mean = p.mean(axis=0)
    return {
        "total": predictive_entropy(p),
        "aleatoric": expected_entropy(p),
        "epistemic": mutual_information(p),
        "confidence": mean.max(axis=1),
        "prediction": mean.argmax(axis=1).astype(np.int64),
    }


def selective_prediction(sample_probs, labels) -> dict:
    """Accuracy-coverage curve and AURC, ranking predictions by the averaged predictive's top probability.

    Returns ``{"coverage": (n,), "accuracy": (n,), "aurc": float}`` (coverage ``k / n``, ``k = 1..n``).
    """
    parts = uncertainty_decomposition(sample_probs)
    y = _check_labels(labels, len(parts["prediction"]), _check_sample_probs(sample_probs).shape[-1])
    correct = parts["prediction"] == y
    coverage, acc = accuracy_coverage_curve(parts["confidence"], correct)
    return {"coverage": coverage, "accuracy": acc, "aurc": aurc(parts["confidence"], correct)}


def task_summary(sample_probs, labels, *, num_bins: int = 15) -> dict:
    """One task's numbers (JSON-ready): metrics of the averaged predictive, uncertainty means, AURC.

    Args:
        sample_probs: ``(S, n, K)`` draws.
        labels: ``(n,)`` gold labels.
        num_bins: bins of the ECE.

    Returns:
        ``classification_metrics`` of ``mean_s p_s`` (acc, ECE %, NLL, Brier) plus ``num_classes``,
        ``num_draws``, ``aurc``, ``mean_confidence`` and, for each of ``total``, ``aleatoric``,
        ``epistemic``, its ``mean``, ``median`` and ``mean_normalized`` (divided by ``log K``); the
        epistemic share of the total is ``epistemic_fraction`` = mean epistemic / mean total.
    """
    p = _check_sample_probs(sample_probs)
    num_draws, _, k = p.shape
    parts = uncertainty_decomposition(p)
    summary = classification_metrics(p.mean(axis=0), labels, num_bins=num_bins)
    summary.update(num_classes=int(k), num_draws=int(num_draws), aurc=selective_prediction(p, labels)["aurc"],
                   mean_confidence=float(parts["confidence"].mean()))
    for name in ("total", "aleatoric", "epistemic"):
        values = parts[name]
        summary[name] = {"mean": float(values.mean()), "median": float(np.median(values)),
                         "mean_normalized": float(values.mean() / math.log(k)) if k > 1 else 0.0}
    total = summary["total"]["mean"]
    summary["epistemic_fraction"] = summary["epistemic"]["mean"] / total if total > 0 else 0.0
    return summary


def _normalized(values: np.ndarray, k: int) -> np.ndarray:
    return values / math.log(k) if k > 1 else np.zeros_like(values)


# Higher score = "more likely OOD". Each takes (S, n, K) draws and returns (n,) scores.
OOD_SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_prob": lambda p: -p.mean(axis=0).max(axis=1),
    "entropy": predictive_entropy,
    "mutual_information": mutual_information,
    "entropy_normalized": lambda p: _normalized(predictive_entropy(p), p.shape[-1]),
    "mutual_information_normalized": lambda p: _normalized(mutual_information(p), p.shape[-1]),
}


def ood_scores(sample_probs) -> dict[str, np.ndarray]:
    """Every score of :data:`OOD_SCORES` for ``(S, n, K)`` draws: ``{name: (n,)}``; higher = more OOD.

    ``max_prob`` is the negated top probability of the averaged predictive (maximum softmax
    probability, Hendrycks & Gimpel, 2017).
    """
    p = _check_sample_probs(sample_probs)
    return {name: score(p) for name, score in OOD_SCORES.items()}


def ood_detection(id_sample_probs, ood_sample_probs) -> dict[str, dict]:
    """AUROC and AUPR (OOD = positive) of each score at separating OOD inputs from in-distribution ones.

    Args:
        id_sample_probs: ``(S, n_in, K_in)`` draws on the in-distribution task.
        ood_sample_probs: ``(S', n_out, K_out)`` draws on the OOD task (K may differ; see the module
            docstring on the ``*_normalized`` scores).

    Returns:
        ``{score name: {"auroc": float, "aupr": float, "aupr_chance": n_out / (n_in + n_out)}}``. AUROC
        0.5 is chance; a score that is constant on both sets (e.g. mutual information of a point
        estimate) gives exactly 0.5.
    """
    scores_in, scores_out = ood_scores(id_sample_probs), ood_scores(ood_sample_probs)
    n_in, n_out = len(next(iter(scores_in.values()))), len(next(iter(scores_out.values())))
    return {
        name: {"auroc": auroc(scores_in[name], scores_out[name]), "aupr": aupr(scores_in[name], scores_out[name]),
               "aupr_chance": n_out / (n_in + n_out)}
        for name in OOD_SCORES
    }


def per_example_table(sample_probs, labels, example_ids=None) -> list[dict]:
    """One JSON-ready row per example: id, label, prediction, correct, confidence, total, aleatoric, epistemic."""
    parts = uncertainty_decomposition(sample_probs)
    n = len(parts["prediction"])
    y = _check_labels(labels, n, _check_sample_probs(sample_probs).shape[-1])
    ids = list(example_ids) if example_ids is not None else list(range(n))
    return [
        {"example": int(ids[i]), "label": int(y[i]), "prediction": int(parts["prediction"][i]),
         "correct": bool(parts["prediction"][i] == y[i]), "confidence": float(parts["confidence"][i]),
         "total": float(parts["total"][i]), "aleatoric": float(parts["aleatoric"][i]),
         "epistemic": float(parts["epistemic"][i])}
        for i in range(n)
    ]


def summarize_tasks(draws: Mapping[str, tuple], *, id_task: str, num_bins: int = 15) -> dict:
    """Per-task summaries and OOD detection of every other task against ``id_task``.

    Args:
        draws: ``{task: (sample_probs (S, n, K), labels (n,))}``.
        id_task: the in-distribution task's key.

    Returns:
        ``{"in_distribution": id_task, "tasks": {task: task_summary}, "ood_detection": {task: ood_detection}}``.
    """
    if id_task not in draws:
        raise ValueError(f"in-distribution task {id_task!r} is not among the evaluated tasks {list(draws)}")
    return {
        "in_distribution": id_task,
        "tasks": {task: task_summary(p, y, num_bins=num_bins) for task, (p, y) in draws.items()},
        "ood_detection": {task: ood_detection(draws[id_task][0], p) for task, (p, _) in draws.items() if task != id_task},
    }

