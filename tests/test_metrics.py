"""Metrics against values computed by hand on small fixed arrays."""

import math

import numpy as np
import pytest
import torch

from blob_pyro.evaluation.metrics import (
    accuracy,
    accuracy_coverage_curve,
    aupr,
    auroc,
    aurc,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    expected_entropy,
    mutual_information,
    negative_log_likelihood,
    predictive_entropy,
    reliability_bins,
)
from blob_pyro.evaluation import metrics

# Two examples, three classes: argmax [0, 1] against labels [0, 2].
PROBS = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
LABELS = np.array([0, 2])


# --- accuracy, NLL, Brier -------------------------------------------------------------------------------


def test_accuracy():
    assert accuracy(PROBS, LABELS) == 0.5
    assert accuracy(PROBS, [0, 1]) == 1.0


def test_negative_log_likelihood():
    assert negative_log_likelihood(PROBS, LABELS) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    # A confident mistake costs -log(eps), not infinity.
    assert negative_log_likelihood([[1.0, 0.0]], [1]) == pytest.approx(-math.log(1e-12))


def test_brier_score():
    # (0.3^2 + 0.2^2 + 0.1^2 + 0.2^2 + 0.5^2 + 0.7^2) / 2 = (0.14 + 0.78) / 2
    assert brier_score(PROBS, LABELS) == pytest.approx(0.46)
    assert brier_score([[1.0, 0.0]], [0]) == 0.0
    assert brier_score([[1.0, 0.0]], [1]) == 2.0


def test_accepts_torch_and_lists():
    assert accuracy(torch.tensor(PROBS, dtype=torch.float32), torch.tensor(LABELS)) == 0.5
    assert brier_score(PROBS.tolist(), LABELS.tolist()) == pytest.approx(0.46)


# --- ECE and its bins -----------------------------------------------------------------------------------


def test_ece_hand_value():
    # Confidences 0.9 (right), 0.6 (wrong), 0.7 (right), 0.8 (wrong); 5 bins of width 0.2.
    # 0.6 and 0.8 lie on edges and go left: bins 2: {0.6}, 3: {0.7, 0.8}, 4: {0.9}.
    probs = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]
    labels = [0, 1, 1, 0]
    bins = reliability_bins(probs, labels, num_bins=5)
    np.testing.assert_array_equal(bins["count"], [0, 0, 1, 2, 1])
    np.testing.assert_allclose(bins["edges"], [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(bins["confidence"][2:], [0.6, 0.75, 0.9])
    np.testing.assert_allclose(bins["accuracy"][2:], [0.0, 0.5, 1.0])
    assert np.isnan(bins["confidence"][:2]).all() and np.isnan(bins["accuracy"][:2]).all()
    # (1 * 0.6 + 2 * 0.25 + 1 * 0.1) / 4
    assert expected_calibration_error(probs, labels, num_bins=5) == pytest.approx(0.3)


def test_ece_edge_goes_to_the_left_bin():
    # Two bins (0, 0.5] and (0.5, 1]. Confidence 0.5 (right) sits alone in bin 0: gap 0.5;
    # confidence 0.9 (wrong) alone in bin 1: gap 0.9. ECE = 0.7 (it would be 0.2 if 0.5 went right).
    probs = [[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]
    assert expected_calibration_error(probs, [0, 1], num_bins=2) == pytest.approx(0.7)
    # 0.7 is the edge 7/10 with 10 bins: bin 6, not 7.
    assert reliability_bins([[0.7, 0.3]], [0], num_bins=10)["count"][6] == 1


def test_ece_confidence_one_goes_to_the_last_bin():
    bins = reliability_bins([[1.0, 0.0]], [0], num_bins=15)
    assert bins["count"][-1] == 1 and bins["count"].sum() == 1
    assert expected_calibration_error([[1.0, 0.0]], [0]) == 0.0
    assert expected_calibration_error([[1.0, 0.0]], [1]) == 1.0


def test_zero_confidence_goes_to_the_first_bin():
    # A top-label probability is never 0; the rule still covers every value in [0, 1].
    index, _ = metrics._bin_indices(np.array([0.0, 1e-9, 1.0]), 15)
    np.testing.assert_array_equal(index, [0, 0, 14])


def test_ece_all_in_one_bin():
    # Confidence 0.7 everywhere (bin 10 of 15), 2 of 3 right: |2/3 - 0.7| = 1/30.
    probs = [[0.7, 0.3]] * 3
    bins = reliability_bins(probs, [0, 0, 1])
    assert bins["count"][10] == 3 and bins["count"].sum() == 3
    assert expected_calibration_error(probs, [0, 0, 1]) == pytest.approx(1 / 30)


def test_ece_perfectly_calibrated_is_zero():
    probs = [[0.75, 0.25]] * 4 + [[0.4, 0.6]] * 5
    labels = [0, 0, 0, 1] + [1, 1, 1, 0, 0]
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_classification_metrics():
    # ECE: confidences 0.7 (right, bin 10) and 0.5 (wrong, bin 7): (0.3 + 0.5) / 2 = 40 %.
    result = classification_metrics(PROBS, LABELS)
    assert result == pytest.approx(
        {
            "acc": 0.5,
            "ece": 40.0,
            "nll": -(math.log(0.7) + math.log(0.3)) / 2,
            "brier": 0.46,
            "n_examples": 2,
            "ece_bins": 15,
        }
    )
    assert isinstance(result["n_examples"], int) and isinstance(result["ece"], float)


# --- uncertainty decomposition -------------------------------------------------------------------------


def test_mutual_information_zero_when_draws_agree():
    sample_probs = np.stack([PROBS] * 4)
    np.testing.assert_allclose(mutual_information(sample_probs), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(predictive_entropy(sample_probs), expected_entropy(sample_probs))


def test_mutual_information_hand_value():
    # Draws [0.8, 0.2] and [0.2, 0.8]: the mean is uniform, total = ln 2; each draw has entropy
    # h = -(0.8 ln 0.8 + 0.2 ln 0.2), so MI = ln 2 - h = 0.192745...
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    sample_probs = np.array([[[0.8, 0.2]], [[0.2, 0.8]]])  # (S=2, n=1, K=2)
    assert predictive_entropy(sample_probs) == pytest.approx([math.log(2)])
    assert expected_entropy(sample_probs) == pytest.approx([h])
    assert mutual_information(sample_probs) == pytest.approx([math.log(2) - h])
    assert mutual_information(sample_probs)[0] == pytest.approx(0.1927448, abs=1e-7)
    # One-hot draws that disagree: MI = ln 2, with 0 log 0 = 0.
    assert mutual_information([[[1.0, 0.0]], [[0.0, 1.0]]]) == pytest.approx([math.log(2)])


def test_single_predictive_has_no_epistemic_part():
    np.testing.assert_allclose(predictive_entropy(PROBS), predictive_entropy(PROBS[None]))
    np.testing.assert_array_equal(mutual_information(PROBS), [0.0, 0.0])


# --- OOD detection --------------------------------------------------------------------------------------


def test_auroc():
    assert auroc([0.1, 0.2], [0.8, 0.9]) == 1.0
    assert auroc([0.8, 0.9], [0.1, 0.2]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [0.5, 0.5]) == 0.5
    # Pairs (out > in): 0.8 beats all three (3); 0.35 beats 0.1, loses to 0.4, ties 0.35 (1.5). 4.5 / 6.
    assert auroc([0.1, 0.4, 0.35], [0.8, 0.35]) == pytest.approx(0.75)


def test_aupr():
    # Descending: 0.8 (OOD), 0.4, 0.3 (OOD), 0.1. Recall steps at 0.8 (P = 1) and at 0.3 (P = 2/3):
    # AP = 0.5 * 1 + 0.5 * 2/3.
    assert aupr([0.1, 0.4], [0.8, 0.3]) == pytest.approx(0.5 + 1 / 3)
    assert aupr([0.1, 0.2], [0.8, 0.9]) == 1.0
    # All tied: a single threshold with precision = the OOD fraction.
    assert aupr([0.5, 0.5, 0.5], [0.5]) == pytest.approx(0.25)


# --- selective prediction ------------------------------------------------------------------------------


def test_accuracy_coverage_and_aurc():
    coverage, acc = accuracy_coverage_curve([0.6, 0.9, 0.7, 0.8], [0, 1, 1, 0])
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(acc, [1.0, 0.5, 2 / 3, 0.5])
    # Risks 0, 1/2, 1/3, 1/2.
    assert aurc([0.6, 0.9, 0.7, 0.8], [0, 1, 1, 0]) == pytest.approx(1 / 3)


def test_aurc_ties_are_broken_in_expectation():
    # The two tied examples count as half right each: accuracies 1, 3/4, 2/3; risks 0, 1/4, 1/3.
    expected = (0 + 1 / 4 + 1 / 3) / 3
    assert aurc([0.9, 0.5, 0.5], [True, True, False]) == pytest.approx(expected)
    assert aurc([0.9, 0.5, 0.5], [True, False, True]) == pytest.approx(expected)


def test_aurc_perfect_ranking():
    assert aurc([0.9, 0.8, 0.2], [1, 1, 1]) == 0.0
    # Right answers first: risks 0, 0, 1/3.
    assert aurc([0.9, 0.8, 0.2], [1, 1, 0]) == pytest.approx(1 / 9)


# --- input validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        ([0.7, 0.3], [0], r"shape \(n, K\)"),
        (PROBS, [0, 1, 2], r"labels must have shape \(2,\)"),
        ([[0.7, 0.2]], [0], "must sum to 1"),
        ([[2.0, -1.0]], [0], r"must lie in \[0, 1\].*not logits"),
        (PROBS, [0, 3], r"labels must lie in \[0, 3\)"),
        (PROBS, [0, -1], r"labels must lie in \[0, 3\)"),
        (PROBS, [0.0, 1.5], "integer class indices"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
        ([[np.nan, 0.5]], [0], "NaN"),
    ],
)
def test_invalid_inputs(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(probs, labels)


def test_invalid_inputs_elsewhere():
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(PROBS, LABELS, num_bins=0)
    with pytest.raises(ValueError, match=r"\(S, n, K\)"):
        mutual_information(np.ones((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="sum to 1"):
        mutual_information([[[0.5, 0.6]]])
    with pytest.raises(ValueError, match="scores_out is empty"):
        auroc([0.1], [])
    with pytest.raises(ValueError, match="scores_in contains 1 NaN"):
        aupr([np.nan], [0.2])
    with pytest.raises(ValueError, match="scores_in must have shape"):
        auroc([[0.1]], [0.2])
    with pytest.raises(ValueError, match="correct must have shape"):
        aurc([0.9, 0.8], [1])
    with pytest.raises(ValueError, match="booleans or 0/1"):
        aurc([0.9, 0.8], [1, 2])
    with pytest.raises(ValueError, match="confidence is empty"):
        accuracy_coverage_curve([], [])
