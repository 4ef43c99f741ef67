"""Classification metrics over predicted probabilities: plain functions, no I/O.

``y_true`` holds class indices, ``probabilities`` one row per image (columns in label order).
"""

import numpy as np
from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support

CALIBRATION_BINS = 10


def classification_report(y_true: np.ndarray, probabilities: np.ndarray, labels: list[str], top_k: int) -> dict:
    """Nested metrics for ``eval/metrics.json`` (DVC flattens them to ``macro.f1`` and so on).

    ``top_k`` is capped at the number of classes; ``top_k`` in the report is the k used.
    """
    classes = np.arange(len(labels))
    y_pred = probabilities.argmax(axis=1)
    k = min(top_k, len(labels))
    report = {
        "accuracy": accuracy_score(y_true, y_pred),
        "top_k": k,
        f"top_{k}_accuracy": top_k_accuracy(y_true, probabilities, k),
        "log_loss": log_loss(y_true, probabilities, labels=classes),
        "ece": expected_calibration_error(y_true, probabilities),
    }
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, average=average, zero_division=0
        )
        report[average] = {"precision": precision, "recall": recall, "f1": f1}
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average=None, zero_division=0
    )
    report["per_class"] = {
        name: {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": int(support[i])}
        for i, name in enumerate(labels)
    }
    report["test_images"] = len(y_true)
    return _rounded(report)


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Share of images whose class is among their k most probable; ties go to the lower class index,
    as in the labels predict and the served model rank. (scikit-learn's top_k_accuracy_score
    refuses two classes: it wants one score column for binary problems.)"""
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(best == y_true[:, np.newaxis], axis=1)))


def reliability(y_true: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS):
    """Per confidence bin (equal width over [0, 1]): mean confidence, accuracy and image count."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    # Bin i holds confidences in (i/bins, (i+1)/bins]; confidence 0 can't occur with >= 1 class.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
    return mean_confidence, accuracy, counts


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Sum over bins of |accuracy - confidence|, weighted by the share of images in the bin."""
    mean_confidence, accuracy, counts = reliability(y_true, probabilities, bins)
    filled = counts > 0
    return float(np.sum(np.abs(accuracy[filled] - mean_confidence[filled]) * counts[filled]) / counts.sum())


def fitted_temperature(y_true: np.ndarray, probabilities: np.ndarray, bounds: tuple[float, float] = (0.25, 4.0)) -> float:
    """Temperature scaling (Guo et al., 2017): the T in ``bounds`` whose softmax(logits / T) has the
    lowest log loss on ``y_true``. log p serves as the logits: softmax forgets per-row shifts."""
    from scipy.optimize import minimize_scalar  # scikit-learn's own dependency

    logits = np.log(np.clip(probabilities, 1e-12, 1)).astype("float64")
    rows = np.arange(len(y_true))

    def log_loss_at(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, y_true]))

    return float(np.exp(minimize_scalar(log_loss_at, bounds=np.log(bounds), method="bounded").x))


def _rounded(tree):
    if isinstance(tree, dict):
        return {k: _rounded(v) for k, v in tree.items()}
    if isinstance(tree, (float, np.floating)):
        return round(float(tree), 4)
    return tree
