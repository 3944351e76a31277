"""Classification, calibration, uncertainty and selective-prediction metrics.

Every function accepts numpy arrays, torch tensors or nested lists, computes in float64 and returns
Python floats or float64 numpy arrays. Shapes used throughout:

* ``probs``: ``(n, K)`` predictive probabilities (rows sum to 1), e.g. BLoB's average of the softmax
  over N posterior samples (BLoB paper, Sec. 3.3);
* ``labels``: ``(n,)`` integer class indices in ``[0, K)``;
* ``sample_probs``: ``(S, n, K)`` probabilities of S posterior samples, before averaging.

Entropies are in nats. Conventions follow the BLoB paper (Wang et al., 2024, Sec. 5): accuracy, top-label
ECE with equal-width bins (L1), NLL of the averaged predictive, and Brier = sum_k (p_k - y_k)^2 averaged
over examples. :func:`expected_calibration_error` returns a fraction; :func:`classification_metrics`
reports it in percent, the paper's unit, together with the bin count (other projects use 10 or 20 bins
and their numbers are not comparable).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PROB_SUM_ATOL",
    "accuracy",
    "expected_calibration_error",
    "negative_log_likelihood",
    "brier_score",
    "reliability_bins",
    "classification_metrics",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "auroc",
    "aupr",
    "accuracy_coverage_curve",
    "aurc",
]

# Rows of probabilities must sum to 1 within this tolerance (float32 softmax is good to ~1e-6).
PROB_SUM_ATOL = 1e-4


# ---------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------


def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:
        raise ValueError(f"{name} must be array-like; got {type(x).__name__}.") from exc


def _check_finite(a: np.ndarray, name: str) -> None:
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); metrics need at least one example.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(a)))} NaN or infinite values.")


def _check_probs(probs, name: str = "probs", ndim: tuple[int, ...] = (2,)) -> np.ndarray:
    p = _to_numpy(probs, name)
    if p.ndim not in ndim:
        want = " or ".join({2: "(n, K)", 3: "(S, n, K)"}[d] for d in ndim)
        raise ValueError(f"{name} must have shape {want}; got shape {p.shape}.")
    if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers; got dtype {p.dtype}.")
    p = p.astype(np.float64)
    _check_finite(p, name)
    if p.shape[-1] < 1:
        raise ValueError(f"{name} has no classes (shape {p.shape}).")
    if p.min() < -PROB_SUM_ATOL or p.max() > 1 + PROB_SUM_ATOL:
        raise ValueError(
            f"{name} must lie in [0, 1]; found values in [{p.min():.4g}, {p.max():.4g}]. "
            "Pass probabilities (softmax of the logits), not logits."
        )
    sums = p.sum(axis=-1)
    worst = np.abs(sums - 1.0).max()
    if worst > PROB_SUM_ATOL:
        raise ValueError(
            f"Each row of {name} must sum to 1 (tolerance {PROB_SUM_ATOL}); the worst row sums to "
            f"{sums.flat[np.abs(sums - 1.0).argmax()]:.6g}. Apply softmax over the class axis (the last) "
            "in float32 or float64."
        )
    return np.clip(p, 0.0, 1.0)


def _check_labels(labels, num_examples: int, num_classes: int) -> np.ndarray:
    y = _to_numpy(labels, "labels")
    if y.ndim != 1 or y.shape[0] != num_examples:
        raise ValueError(f"labels must have shape ({num_examples},) to match probs; got shape {y.shape}.")
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"labels must be integer class indices; got dtype {y.dtype}.")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} classes; found values in "
            f"[{y.min()}, {y.max()}]."
        )
    return y.astype(np.int64)


def _check_probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = _check_probs(probs)
    return p, _check_labels(labels, p.shape[0], p.shape[1])


def _check_scores(scores, name: str) -> np.ndarray:
    s = _to_numpy(scores, name)
    if s.ndim != 1:
        raise ValueError(f"{name} must have shape (n,); got shape {s.shape}.")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer) or s.dtype == bool):
        raise ValueError(f"{name} must hold real numbers; got dtype {s.dtype}.")
    s = s.astype(np.float64)
    _check_finite(s, name)
    return s


def _check_num_bins(num_bins: int) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer; got {num_bins!r}.")


# ---------------------------------------------------------------------------------------------------
# Classification and calibration
# ---------------------------------------------------------------------------------------------------


def accuracy(probs, labels) -> float:
    """Fraction of examples whose argmax class equals the label. probs ``(n, K)``, labels ``(n,)``.

    Ties in ``probs`` go to the lowest class index (``argmax``).
    """
    p, y = _check_probs_labels(probs, labels)
    return float(np.mean(p.argmax(axis=1) == y))


def _bin_indices(confidence: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    # Edges i / B, computed by division so that a confidence written as a decimal literal on an edge
    # (0.7 with B = 10) compares equal to it; linspace accumulates rounding error.
    edges = np.arange(num_bins + 1, dtype=np.float64) / num_bins
    # side="left": a confidence equal to edges[i] gets index i - 1, i.e. the bin on its left.
    index = np.searchsorted(edges, confidence, side="left") - 1
    return np.clip(index, 0, num_bins - 1), edges


def reliability_bins(probs, labels, *, num_bins: int = 15) -> dict:
    """Per-bin statistics of top-label confidence, for ECE and reliability diagrams.

    Bin ``i`` (of ``B = num_bins`` equal-width bins) covers the confidences in ``(i/B, (i+1)/B]``; bin 0
    also includes 0. So a confidence exactly on an inner edge goes to the bin on its left and a
    confidence of 1.0 to the last bin.

    Args:
        probs: ``(n, K)`` predictive probabilities.
        labels: ``(n,)`` integer labels.
        num_bins: B.

    Returns:
        dict of float64 / int64 numpy arrays: ``edges`` ``(B + 1,)``; ``count`` ``(B,)``;
        ``confidence`` ``(B,)``, the mean top-label probability in each bin; ``accuracy`` ``(B,)``, the
        fraction correct in each bin. ``confidence`` and ``accuracy`` are NaN in empty bins.
    """
    _check_num_bins(num_bins)
    p, y = _check_probs_labels(probs, labels)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    index, edges = _bin_indices(confidence, num_bins)
    count = np.bincount(index, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=num_bins) / count
        bin_accuracy = np.bincount(index, weights=correct, minlength=num_bins) / count
    return {
        "edges": edges,
        "count": count.astype(np.int64),
        "confidence": np.where(count > 0, mean_confidence, np.nan),
        "accuracy": np.where(count > 0, bin_accuracy, np.nan),
    }


def expected_calibration_error(probs, labels, *, num_bins: int = 15) -> float:
    """Top-label expected calibration error, a fraction in ``[0, 1]`` (multiply by 100 for percent).

    ``ECE = sum_i (n_i / n) |acc_i - conf_i|`` over ``num_bins`` equal-width bins on [0, 1], with the
    binning rule of :func:`reliability_bins` (bin ``i`` covers ``(i/B, (i+1)/B]``, bin 0 also 0).
    probs ``(n, K)``, labels ``(n,)``. Guo et al. (2017); the BLoB paper uses B = 15.
    """
    bins = reliability_bins(probs, labels, num_bins=num_bins)
    count = bins["count"]
    filled = count > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(count[filled] * gaps) / count.sum())


def negative_log_likelihood(probs, labels, *, eps: float = 1e-12) -> float:
    """Mean of ``-log p(label)`` under the given (already averaged) predictive, in nats.

    probs ``(n, K)``, labels ``(n,)``. Probabilities are floored at ``eps`` so a confident mistake
    costs ``-log(eps)`` (27.6 nats by default) instead of infinity.
    """
    p, y = _check_probs_labels(probs, labels)
    return float(np.mean(-np.log(np.maximum(p[np.arange(len(y)), y], eps))))


def brier_score(probs, labels) -> float:
    """Mean over examples of ``sum_k (p_k - y_k)^2`` with ``y`` one-hot; in ``[0, 2]``.

    probs ``(n, K)``, labels ``(n,)``.
    """
    p, y = _check_probs_labels(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def classification_metrics(probs, labels, *, num_bins: int = 15) -> dict:
    """The BLoB paper's table of metrics for one predictive.

    Args:
        probs: ``(n, K)`` predictive probabilities (for BLoB with N samples: the mean of the N softmaxes).
        labels: ``(n,)`` integer labels.
        num_bins: bins of the ECE.

    Returns:
        ``{"acc": fraction, "ece": percent, "nll": nats, "brier": float, "n_examples": int,
        "ece_bins": num_bins}``, all plain Python numbers (JSON-ready). Use :func:`reliability_bins`
        for the per-bin statistics.
    """
    p, y = _check_probs_labels(probs, labels)
    return {
        "acc": accuracy(p, y),
        "ece": 100.0 * expected_calibration_error(p, y, num_bins=num_bins),
        "nll": negative_log_likelihood(p, y),
        "brier": brier_score(p, y),
        "n_examples": int(len(y)),
        "ece_bins": int(num_bins),
    }


# ---------------------------------------------------------------------------------------------------
# Uncertainty decomposition over posterior samples
# ---------------------------------------------------------------------------------------------------


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats along the last axis, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=-1)


def _check_sample_probs(sample_probs) -> np.ndarray:
    p = _check_probs(sample_probs, "sample_probs", ndim=(2, 3))
    return p[None] if p.ndim == 2 else p


def predictive_entropy(sample_probs) -> np.ndarray:
    """Total uncertainty: entropy of the mean predictive, ``H[mean_s p_s]``, shape ``(n,)``.

    sample_probs ``(S, n, K)``; an ``(n, K)`` array is read as a single sample (S = 1).
    """
    p = _check_sample_probs(sample_probs)
    return _entropy(p.mean(axis=0))


def expected_entropy(sample_probs) -> np.ndarray:
    """Aleatoric uncertainty: mean entropy of the samples, ``mean_s H[p_s]``, shape ``(n,)``.

    sample_probs ``(S, n, K)`` (or ``(n, K)``, S = 1).
    """
    p = _check_sample_probs(sample_probs)
    return _entropy(p).mean(axis=0)


def mutual_information(sample_probs) -> np.ndarray:
    """Epistemic uncertainty: ``H[mean_s p_s] - mean_s H[p_s]`` (BALD; Houlsby et al., 2011), ``(n,)``.

    The difference is non-negative in exact arithmetic; float rounding is clipped at 0.
    sample_probs ``(S, n, K)`` (or ``(n, K)``, which gives 0).
    """
    p = _check_sample_probs(sample_probs)
    return np.maximum(_entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0), 0.0)


# ---------------------------------------------------------------------------------------------------
# Out-of-distribution detection
# ---------------------------------------------------------------------------------------------------


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve for separating OOD (positive) from in-distribution inputs.

    A higher score must mean "more OOD" (e.g. predictive entropy or mutual information). Computed from
    ranks (Mann-Whitney U): the probability that a random OOD input scores higher than a random
    in-distribution one, ties counted 1/2. 1.0 is perfect, 0.5 chance, 0.0 perfectly inverted.

    Args:
        scores_in: ``(n_in,)`` scores of in-distribution inputs.
        scores_out: ``(n_out,)`` scores of OOD inputs.
    """
    s_in, s_out = _check_scores(scores_in, "scores_in"), _check_scores(scores_out, "scores_out")
    n_in, n_out = len(s_in), len(s_out)
    ranks = _average_ranks(np.concatenate([s_in, s_out]))
    u_out = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u_out / (n_in * n_out))


def aupr(scores_in, scores_out) -> float:
    """Area under the precision-recall curve with OOD as the positive class (average precision).

    ``AP = sum_t (R_t - R_{t-1}) P_t`` over the distinct score thresholds t in decreasing order, where
    ``P_t``, ``R_t`` are the precision and recall of "OOD if score >= t" (the step-wise definition of
    scikit-learn's ``average_precision_score``; tied scores enter together). A higher score must mean
    "more OOD". Chance level is the OOD fraction ``n_out / (n_in + n_out)``.

    Args:
        scores_in: ``(n_in,)`` scores of in-distribution inputs.
        scores_out: ``(n_out,)`` scores of OOD inputs.
    """
    s_in, s_out = _check_scores(scores_in, "scores_in"), _check_scores(scores_out, "scores_out")
    scores = np.concatenate([s_in, s_out])
    positive = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    # The last index of each group of tied scores: one threshold per distinct score.
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    true_pos = np.cumsum(positive)[last]
    predicted_pos = last + 1.0
    precision = true_pos / predicted_pos
    recall = true_pos / len(s_out)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ---------------------------------------------------------------------------------------------------
# Selective prediction
# ---------------------------------------------------------------------------------------------------


def accuracy_coverage_curve(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of the ``k`` most confident predictions against coverage ``k / n``, ``k = 1..n``.

    Tied confidences cannot be ordered, so within a group of ties the accuracy is its expectation under
    a uniformly random order (the group's correct predictions enter at an even rate); without ties this
    is the plain cumulative accuracy.

    Args:
        confidence: ``(n,)`` confidence of each prediction (e.g. the top-label probability).
        correct: ``(n,)`` booleans (or 0/1): whether each prediction is right.

    Returns:
        ``(coverage, accuracy)``, two float64 arrays of shape ``(n,)``; coverage increases to 1.
    """
    conf = _check_scores(confidence, "confidence")
    ok = _to_numpy(correct, "correct")
    if ok.shape != conf.shape:
        raise ValueError(f"correct must have shape {conf.shape} to match confidence; got shape {ok.shape}.")
    if not np.all(np.isin(ok, (0, 1))):
        raise ValueError("correct must hold booleans or 0/1 values.")
    ok = ok.astype(np.float64)
    n = len(conf)
    order = np.argsort(-conf, kind="mergesort")
    conf, ok = conf[order], ok[order]
    # Replace each example's 0/1 by the mean of its tie group: the expected value at each position.
    _, group, counts = np.unique(-conf, return_inverse=True, return_counts=True)
    ok_expected = (np.bincount(group, weights=ok) / counts)[group]
    k = np.arange(1, n + 1, dtype=np.float64)
    return k / n, np.cumsum(ok_expected) / k


def aurc(confidence, correct) -> float:
    """Area under the risk-coverage curve (Geifman et al., 2019): lower is better.

    The mean of the selective risk ``1 - accuracy`` over the ``n`` coverages ``k / n`` of
    :func:`accuracy_coverage_curve` (ties broken in expectation). confidence ``(n,)``, correct ``(n,)``.
    """
    _, acc = accuracy_coverage_curve(confidence, correct)
    return float(np.mean(1.0 - acc))
