"""Evaluation metrics against values worked out by hand on a tiny fixed prediction set."""

import math

import numpy as np
import pytest

from pipeline.metrics import classification_report, expected_calibration_error, reliability

LABELS = ["cat", "dog", "fox"]
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBABILITIES = np.array([
    [0.7, 0.2, 0.1],  # cat, right (confidence 0.7)
    [0.3, 0.6, 0.1],  # cat -> dog, wrong (0.6); cat is second
    [0.1, 0.8, 0.1],  # dog, right (0.8)
    [0.2, 0.7, 0.1],  # dog, right (0.7)
    [0.05, 0.05, 0.9],  # fox, right (0.9)
    [0.5, 0.1, 0.4],  # fox -> cat, wrong (0.5); fox is second
])


def test_report_matches_hand_computed_values():
    report = classification_report(Y_TRUE, PROBABILITIES, LABELS, top_k=2)
    assert report["accuracy"] == round(4 / 6, 4)
    assert report["top_2_accuracy"] == 1.0  # both misses have the true class second
    expected_log_loss = -np.mean(np.log([0.7, 0.3, 0.8, 0.7, 0.9, 0.4]))
    assert report["log_loss"] == round(expected_log_loss, 4)
    # cat: predicted for rows 0 and 5 (1 right) -> precision 1/2; 1 of 2 cats found -> recall 1/2
    # dog: predicted rows 1, 2, 3 (2 right) -> precision 2/3, recall 2/2
    # fox: predicted row 4 (right) -> precision 1, recall 1/2
    assert report["per_class"]["cat"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["per_class"]["dog"] == {"precision": 0.6667, "recall": 1.0, "f1": 0.8, "support": 2}
    assert report["per_class"]["fox"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}
    assert report["macro"]["precision"] == round((0.5 + 2 / 3 + 1) / 3, 4)
    assert report["macro"]["f1"] == round((0.5 + 0.8 + 2 / 3) / 3, 4)
    assert report["weighted"]["recall"] == round(4 / 6, 4)  # equal supports: weighted = macro recall
    assert report["test_images"] == 6


def test_top_k_is_capped_at_the_number_of_classes():
    assert classification_report(Y_TRUE, PROBABILITIES, LABELS, top_k=5)["top_3_accuracy"] == 1.0


def test_expected_calibration_error_by_hand():
    # Bins of width 0.1: (0.4,0.5]: row 5 conf .5 wrong; (0.5,0.6]: row 1 conf .6 wrong;
    # (0.6,0.7]: rows 0, 3 conf .7 both right; (0.7,0.8]: row 2 right; (0.8,0.9]: row 4 right.
    expected = (abs(0 - 0.5) + abs(0 - 0.6) + 2 * abs(1 - 0.7) + abs(1 - 0.8) + abs(1 - 0.9)) / 6
    assert expected_calibration_error(Y_TRUE, PROBABILITIES) == pytest.approx(expected)
    confidence, accuracy, counts = reliability(Y_TRUE, PROBABILITIES)
    assert counts.tolist() == [0, 0, 0, 0, 1, 1, 2, 1, 1, 0]
    assert accuracy[6] == 1.0 and accuracy[4] == 0.0 and math.isnan(accuracy[0])
    assert confidence[6] == pytest.approx(0.7)


def test_perfectly_calibrated_predictions_have_zero_error():
    probabilities = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(np.array([0, 1]), probabilities) == 0.0
