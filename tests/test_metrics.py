"""Evaluation metrics against values worked out by hand on a tiny fixed prediction set, from two
classes to hundreds; the MLflow keys of per-class metrics; the plots of many classes."""

import math
import warnings

import mlflow
import numpy as np
import pytest
from mlflow.utils.validation import _validate_metric
from PIL import Image
from sklearn.metrics import f1_score, top_k_accuracy_score

from pipeline.report import gradcam, plots, tracking
from pipeline.report.metrics import (
    classification_report,
    expected_calibration_error,
    fitted_temperature,
    images_for,
    interval_warning,
    macro_f1,
    reliability,
)

LABELS = ["cat", "dog", "fox"]
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBABILITIES = np.array(
    [
        [0.7, 0.2, 0.1],  # cat, right (confidence 0.7)
        [0.3, 0.6, 0.1],  # cat -> dog, wrong (0.6); cat is second
        [0.1, 0.8, 0.1],  # dog, right (0.8)
        [0.2, 0.7, 0.1],  # dog, right (0.7)
        [0.05, 0.05, 0.9],  # fox, right (0.9)
        [0.5, 0.1, 0.4],  # fox -> cat, wrong (0.5); fox is second
    ]
)


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


def test_accuracy_interval_is_wilsons_and_macro_f1s_a_bootstrap_around_the_value():
    report = classification_report(Y_TRUE, PROBABILITIES, LABELS, top_k=2)
    # Wilson's score interval for 4 of 6 at 95 %, by its formula
    n, p, z = 6, 4 / 6, 1.959964
    centre, half = (
        (p + z**2 / (2 * n)) / (1 + z**2 / n),
        z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)),
    )
    assert report["accuracy_ci95"] == {"low": round(centre - half, 4), "high": round(centre + half, 4)}
    interval = report["macro_f1_ci95"]
    assert 0 <= interval["low"] < report["macro"]["f1"] < interval["high"] <= 1
    assert classification_report(Y_TRUE, PROBABILITIES, LABELS, top_k=2) == report  # a seeded bootstrap


def test_vectorized_macro_f1_is_scikit_learns_with_unseen_classes_counted():
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 4, (5, 40)), rng.integers(0, 4, (5, 40))  # class 4: no image, never predicted
    expected = [f1_score(t, p, labels=range(5), average="macro", zero_division=0) for t, p in zip(y_true, y_pred)]
    np.testing.assert_allclose(macro_f1(y_true, y_pred, 5), expected)


def test_a_test_split_too_small_for_five_points_gets_a_one_line_warning():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 2000)

    def report(n: int) -> dict:  # 80 % right
        probabilities = np.eye(3)[np.where(np.arange(n) % 5 == 0, (y_true[:n] + 1) % 3, y_true[:n])] * 0.7 + 0.1
        return classification_report(y_true[:n], probabilities, LABELS, top_k=1)

    small, large = report(45), report(2000)
    warning = interval_warning(small)
    assert warning.startswith(
        "warning: 45 test images measure accuracy only to +-11 points (95 % interval 0.662-0.891); "
    )
    assert (
        warning.endswith(
            f"+-5 points takes about {images_for(0.8, 0.05)} test images (more data, or a larger prepare.split.test)"
        )
        and "\n" not in warning
    )
    assert 230 <= images_for(0.8, 0.05) <= 260  # 1.96^2 x 0.8 x 0.2 / 0.05^2 = 246 by the normal approximation
    assert interval_warning(large) is None


def test_top_k_is_capped_at_the_number_of_classes():
    report = classification_report(Y_TRUE, PROBABILITIES, LABELS, top_k=5)
    assert report["top_k"] == 3 and report["top_3_accuracy"] == 1.0


def test_two_classes_with_top_k_1_and_2():
    y_true = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
    top_1 = classification_report(y_true, probabilities, ["cat", "dog"], top_k=1)
    assert top_1["top_k"] == 1 and top_1["top_1_accuracy"] == top_1["accuracy"] == 0.5
    # cat: predicted for rows 0 and 3 (row 0 right); dog: rows 1 and 2 (row 2 right)
    assert top_1["per_class"] == {
        "cat": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "dog": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
    }
    assert top_1["log_loss"] == round(-np.mean(np.log([0.9, 0.4, 0.7, 0.2])), 4)
    assert classification_report(y_true, probabilities, ["cat", "dog"], top_k=2)["top_2_accuracy"] == 1.0
    # A tie goes to the lower class index, as predict and the served model rank them.
    assert classification_report(np.array([1]), np.array([[0.5, 0.5]]), ["cat", "dog"], top_k=1)["top_1_accuracy"] == 0


def test_hundred_classes_with_two_images_each_and_one_class_unseen():
    rng = np.random.default_rng(0)
    labels = [f"class {i}" for i in range(100)]
    y_true = np.repeat(np.arange(99), 2)  # class 99 has no test image
    probabilities = rng.dirichlet(np.ones(100), size=len(y_true))
    report = classification_report(y_true, probabilities, labels, top_k=5)
    assert report["top_5_accuracy"] == round(top_k_accuracy_score(y_true, probabilities, k=5, labels=range(100)), 4)
    assert report["accuracy"] == round(float(np.mean(probabilities.argmax(axis=1) == y_true)), 4)
    assert list(report["per_class"]) == labels
    assert report["per_class"]["class 99"]["support"] == 0
    assert sum(c["support"] for c in report["per_class"].values()) == report["test_images"] == 198


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


# Names a folder can have that MLflow refuses in a metric key, or that collide once made safe.
ODD_NAMES = [
    "daisy",
    "red-fox",
    "a_b",
    "a b",
    "a.b",
    "a_b.1",
    "cats, big",
    'say "cheese"',
    "it's",
    "new\nline",
    "Ünïcode",
    "猫",
    "..",
    "x" * 250,
    "x" * 251,
    "a:b",
    "$\\notmath$",
]


def test_class_keys_are_unique_valid_mlflow_keys_and_plain_names_stay():
    keys = tracking.class_keys(ODD_NAMES)
    assert len(set(keys)) == len(keys)
    for key in keys:
        for score in ("precision", "recall", "f1", "support"):
            _validate_metric(f"test_per_class_{key}_{score}", 0.5, 0, 0)  # raises MlflowException if invalid
    assert keys[:3] == ["daisy", "red-fox", "a_b"]
    assert keys[3] == "a_b.3" and keys[5] == "a_b_1.5" and keys[10] == "Unicode.10" and keys[11] == "_.11"


def test_per_class_metrics_of_odd_names_log_to_mlflow_with_the_names_beside(tmp_path):
    rng = np.random.default_rng(1)
    y_true = np.arange(len(ODD_NAMES))
    report = classification_report(y_true, rng.dirichlet(np.ones(len(ODD_NAMES)), len(y_true)), ODD_NAMES, top_k=3)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("keys", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as logged:
        tracking.log_test_metrics(report)
    data = mlflow.MlflowClient().get_run(logged.info.run_id).data
    metrics = data.metrics
    keys = tracking.class_keys(ODD_NAMES)
    # precision, recall, F1 per class, nothing overwritten; supports are counts, not metrics
    assert len([k for k in metrics if k.startswith("test_per_class_")]) == 3 * len(ODD_NAMES)
    for key, name in zip(keys, ODD_NAMES, strict=True):
        assert metrics[f"test_per_class_{key}_recall"] == report["per_class"][name]["recall"]
    assert metrics["test_accuracy"] == report["accuracy"] and metrics["test_macro_f1"] == report["macro"]["f1"]
    assert metrics["test_accuracy_ci95_low"] == report["accuracy_ci95"]["low"]
    assert metrics["test_macro_f1_ci95_high"] == report["macro_f1_ci95"]["high"]
    # k and the image count are tags
    assert not {"test_top_k", "test_test_images"} & set(metrics) and not any(k.endswith("_support") for k in metrics)
    assert (data.tags["test_top_k"], data.tags["test_images"]) == ("3", str(len(ODD_NAMES)))
    names = mlflow.artifacts.load_dict(f"runs:/{logged.info.run_id}/{tracking.CLASS_KEYS_ARTIFACT}")
    assert names == dict(zip(keys, ODD_NAMES, strict=True))


@pytest.mark.parametrize("classes", [2, 100])
def test_confusion_matrices_of_many_classes_stay_bounded(tmp_path, classes):
    rng = np.random.default_rng(classes)
    labels = [ODD_NAMES[i % len(ODD_NAMES)] + f" {i}" for i in range(classes)]  # long, multi-line, with $...$
    y_true = np.repeat(np.arange(classes), 2)
    paths = plots.confusion_matrices(y_true, rng.integers(0, classes, len(y_true)), labels, tmp_path)
    assert [p.name for p in paths] == ["confusion_matrix.png", "confusion_matrix_normalized.png"]
    most = (plots.MATRIX_INCHES + 3) * 100  # pixels: the cells, plus room for the names, at 100 dpi
    for path in paths:
        assert max(Image.open(path).size) <= most


def test_gradcam_grid_takes_two_per_class_then_one_for_each_of_the_first_classes():
    few = np.repeat(np.arange(3), 4)
    assert few[gradcam.examples(few)].tolist() == [0, 0, 1, 1, 2, 2]
    many = np.repeat(np.arange(100), 3)
    assert many[gradcam.examples(many)].tolist() == list(range(gradcam.IMAGES))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_fitted_temperature_recovers_the_temperature_the_labels_were_drawn_at(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20_000, 5))
    drawn = np.exp(logits / temperature)
    drawn /= drawn.sum(axis=1, keepdims=True)
    y_true = np.array([rng.choice(5, p=p) for p in drawn])
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))  # what a model at T = 1 says
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    assert fitted_temperature(y_true, probabilities) == pytest.approx(temperature, rel=0.05)


def test_class_names_in_cjk_scripts_are_drawn_not_boxes(tmp_path):
    """With Noto Sans CJK on the system (make test installs Debian's fonts-noto-cjk), no glyph is missing."""
    labels = ["猫", "犬", "고양이", "cat"]
    y = np.array([0, 1, 2, 3, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)" for each box it draws
        plots.confusion_matrices(y, y[::-1], labels, tmp_path)
        plots.image_grid(
            [np.zeros((8, 8, 3), "uint8")] * 2,
            ["猫 → 犬", "고양이"],
            tmp_path / "grid.png",
            overlays=[np.ones((2, 2))] * 2,
            heading="Grad-CAM 猫",
        )
    assert (tmp_path / "grid.png").stat().st_size > 0
