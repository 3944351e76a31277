"""Uncertainty decomposition, per-task summaries, OOD detection and selective prediction, by hand."""

import math

import numpy as np
import pytest

from blob_pyro.evaluation.uncertainty import (
    OOD_SCORES, ood_detection, ood_scores, per_example_table, selective_prediction, summarize_tasks, task_summary,
    uncertainty_decomposition,
)

LOG2, LOG3 = math.log(2.0), math.log(3.0)

# Example 0: two draws that disagree completely; example 1: two identical draws; example 2: both uniform.
DRAWS = np.array([
    [[1.0, 0.0], [0.8, 0.2], [0.5, 0.5]],
    [[0.0, 1.0], [0.8, 0.2], [0.5, 0.5]],
])
H_08 = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))


def test_decomposition_by_hand():
    parts = uncertainty_decomposition(DRAWS)
    np.testing.assert_allclose(parts["total"], [LOG2, H_08, LOG2])
    np.testing.assert_allclose(parts["aleatoric"], [0.0, H_08, LOG2])
    np.testing.assert_allclose(parts["epistemic"], [LOG2, 0.0, 0.0], atol=1e-15)  # agreeing draws: MI = 0
    np.testing.assert_allclose(parts["total"], parts["aleatoric"] + parts["epistemic"])
    np.testing.assert_allclose(parts["confidence"], [0.5, 0.8, 0.5])
    np.testing.assert_array_equal(parts["prediction"], [0, 0, 0])  # ties go to the lowest class


def test_single_draw_has_no_epistemic_uncertainty():
    parts = uncertainty_decomposition(DRAWS[0])  # (n, K) is one draw
    np.testing.assert_array_equal(parts["epistemic"], 0.0)
    np.testing.assert_allclose(parts["total"], parts["aleatoric"])


def test_task_summary_by_hand():
    labels = np.array([1, 0, 1])
    summary = task_summary(DRAWS, labels, num_bins=10)
    # averaged predictive rows: [.5, .5], [.8, .2], [.5, .5] -> predictions 0, 0, 0 -> correct: F, T, F
    assert summary["acc"] == pytest.approx(1 / 3)
    assert summary["num_classes"] == 2 and summary["num_draws"] == 2 and summary["ece_bins"] == 10
    assert summary["mean_confidence"] == pytest.approx(0.6)
    assert summary["total"]["mean"] == pytest.approx((2 * LOG2 + H_08) / 3)
    assert summary["total"]["median"] == pytest.approx(LOG2)
    assert summary["epistemic"]["mean"] == pytest.approx(LOG2 / 3)
    assert summary["epistemic"]["mean_normalized"] == pytest.approx(1 / 3)  # divided by log K = log 2
    assert summary["epistemic_fraction"] == pytest.approx((LOG2 / 3) / ((2 * LOG2 + H_08) / 3))
    # selective risk: most confident first (0.8, correct), then the two tied 0.5s (both wrong)
    assert summary["aurc"] == pytest.approx(np.mean([0.0, 0.5, 2 / 3]))


def test_selective_prediction_curve_by_hand():
    draws = np.array([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]]])
    labels = np.array([0, 1, 1, 0])  # confidences 0.9 (right), 0.7 (right), 0.6 (wrong), 0.55 (right)
    out = selective_prediction(draws, labels)
    np.testing.assert_allclose(out["coverage"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(out["accuracy"], [1.0, 1.0, 2 / 3, 0.75])
    assert out["aurc"] == pytest.approx(np.mean([0.0, 0.0, 1 / 3, 0.25]))


def _confident(n, k, p_top=0.98):
    rows = np.full((n, k), (1 - p_top) / (k - 1))
    rows[:, 0] = p_top
    return np.stack([rows, rows])  # two identical draws


def test_ood_perfect_separator_and_constant_score():
    id_draws = _confident(5, 3)
    ood_draws = np.full((2, 4, 3), 1 / 3)  # uniform: maximal entropy, all draws agree
    result = ood_detection(id_draws, ood_draws)
    assert set(result) == set(OOD_SCORES)
    for score in ("max_prob", "entropy", "entropy_normalized"):
        assert result[score]["auroc"] == 1.0
        assert result[score]["aupr"] == 1.0
    # every draw agrees in both sets: mutual information is 0 everywhere, a useless score
    assert result["mutual_information"]["auroc"] == 0.5
    assert result["mutual_information"]["aupr"] == pytest.approx(4 / 9)
    assert result["entropy"]["aupr_chance"] == pytest.approx(4 / 9)


def test_ood_detection_by_mutual_information():
    id_draws = _confident(6, 2)
    ood = np.array([[[0.9, 0.1]] * 3, [[0.1, 0.9]] * 3])  # draws disagree: MI > 0
    assert ood_detection(id_draws, ood)["mutual_information"]["auroc"] == 1.0
    assert ood_detection(ood, id_draws)["mutual_information"]["auroc"] == 0.0  # roles swapped: inverted


def test_normalized_entropy_corrects_for_different_numbers_of_classes():
    # ID: 3 classes, fairly uncertain (entropy ~0.95 nats, 87% of log 3); OOD: 2 classes, uniform (log 2 = 0.69).
    id_draws = np.array([[[0.6, 0.2, 0.2]] * 4] * 2)
    ood_draws = np.full((2, 4, 2), 0.5)
    scores = ood_scores(ood_draws)
    np.testing.assert_allclose(scores["entropy_normalized"], 1.0)
    np.testing.assert_allclose(scores["max_prob"], -0.5)
    result = ood_detection(id_draws, ood_draws)
    assert result["entropy"]["auroc"] == 0.0  # raw entropy calls the OOD task *less* uncertain
    assert result["entropy_normalized"]["auroc"] == 1.0


def test_per_example_table_and_task_summaries():
    labels = np.array([1, 0, 1])
    rows = per_example_table(DRAWS, labels, example_ids=[7, 8, 9])
    assert rows[1] == {"example": 8, "label": 0, "prediction": 0, "correct": True, "confidence": pytest.approx(0.8),
                       "total": pytest.approx(H_08), "aleatoric": pytest.approx(H_08), "epistemic": pytest.approx(0.0)}
    summary = summarize_tasks({"a": (DRAWS, labels), "b": (np.full((2, 3, 2), 0.5), labels)}, id_task="a")
    assert summary["in_distribution"] == "a"
    assert set(summary["tasks"]) == {"a", "b"} and set(summary["ood_detection"]) == {"b"}
    assert summary["ood_detection"]["b"]["entropy"]["auroc"] == pytest.approx(ood_detection(DRAWS, np.full((2, 3, 2), 0.5))["entropy"]["auroc"])
    with pytest.raises(ValueError, match=r"in-distribution task 'c' is not among the evaluated tasks \['a', 'b'\]"):
        summarize_tasks({"a": (DRAWS, labels), "b": (DRAWS, labels)}, id_task="c")


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="sample_probs must have shape"):
        uncertainty_decomposition(np.ones((2, 2, 2, 2)) / 2)
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        task_summary(DRAWS, [0, 1])
