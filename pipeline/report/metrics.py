"""Classification metrics over predicted probabilities: plain functions, no I/O.

``y_true`` holds class indices, ``probabilities`` one row per image (columns in label order).
"""

import numpy as np
from scipy.stats import binomtest, bootstrap
from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support

CALIBRATION_BINS = 10
CONFIDENCE = 0.95  # of the intervals beside accuracy and macro F1
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # a fixed seed: the same predictions always give the same interval
WIDE_HALF_WIDTH = 0.05  # an accuracy interval wider than +-5 points gets a warning


def classification_report(y_true: np.ndarray, probabilities: np.ndarray, labels: list[str], top_k: int) -> dict:
    """Nested metrics for ``eval/metrics.json`` (DVC flattens them to ``macro.f1`` and so on).

    ``top_k`` is capped at the number of classes; ``top_k`` in the report is the k used.
    """
    classes = np.arange(len(labels))
    y_pred = probabilities.argmax(axis=1)
    k = min(top_k, len(labels))
    report = {
        "accuracy": accuracy_score(y_true, y_pred),
        "accuracy_ci95": accuracy_interval(y_true, y_pred),
        "macro_f1_ci95": macro_f1_interval(y_true, y_pred, len(labels)),
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


def accuracy_interval(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """The Wilson score interval of the accuracy (right for a proportion, also near 0 or 1 and on few images)."""
    low, high = wilson(int(np.sum(y_true == y_pred)), len(y_true))
    return {"low": low, "high": high}


def wilson(successes: int, trials: int) -> tuple[float, float]:
    interval = binomtest(successes, trials).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def macro_f1_interval(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """A percentile bootstrap interval of the macro F1 (test images resampled with replacement; macro
    F1 has no closed-form interval). Fewer than two images: the whole range."""
    if len(y_true) < 2:
        return {"low": 0.0, "high": 1.0}
    result = bootstrap(
        (y_true, y_pred),
        lambda t, p, axis: macro_f1(t, p, n_classes),
        paired=True,
        vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        batch=100,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return {"low": float(result.confidence_interval.low), "high": float(result.confidence_interval.high)}


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro F1 of each row of ``y_true``/``y_pred`` (``(resamples, images)``), every class counted
    (one without images nor predictions scores 0, as scikit-learn's ``zero_division=0``):
    F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (true + predicted)."""
    rows = np.arange(y_true.shape[0])[:, np.newaxis] * n_classes
    size = y_true.shape[0] * n_classes

    def counts(classes: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount((rows + classes).ravel(), weights, minlength=size).reshape(-1, n_classes)

    true_positives = counts(y_true, (y_true == y_pred).ravel())
    total = counts(y_true) + counts(y_pred)
    f1 = np.divide(2 * true_positives, total, out=np.zeros_like(true_positives), where=total > 0)
    return f1.mean(axis=1)


def interval_warning(report: dict) -> str | None:
    """One line when the test split is too small for the accuracy's interval to be within +-5
    points (a difference between two runs smaller than that is then no difference); else None."""
    interval, n = report["accuracy_ci95"], report["test_images"]
    half = (interval["high"] - interval["low"]) / 2
    if half <= WIDE_HALF_WIDTH:
        return None
    return (
        f"warning: {n} test images measure accuracy only to +-{100 * half:.0f} points (95 % interval "
        f"{interval['low']:.3f}-{interval['high']:.3f}); +-{100 * WIDE_HALF_WIDTH:.0f} points takes about "
        f"{images_for(report['accuracy'], WIDE_HALF_WIDTH)} test images (more data, or a larger prepare.split.test)"
    )


def images_for(accuracy: float, half_width: float) -> int:
    """About how many test images make the Wilson interval of ``accuracy`` at most +-``half_width``."""

    def fits(n: int) -> bool:
        low, high = wilson(round(accuracy * n), n)
        return (high - low) / 2 <= half_width

    low, high = 1, 2
    while not fits(high):
        low, high = high, high * 2
    while high - low > 1:  # the smallest n that fits, between low (too few) and high
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Share of images whose class is among their k most probable; ties go to the lower class index,
    as in the labels predict and the served model rank. (scikit-learn's top_k_accuracy_score
    refuses two classes: it wants one score column for binary problems.)"""
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(best == y_true[:, np.newaxis], axis=1)))


def reliability(
    y_true: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def fitted_temperature(
    y_true: np.ndarray, probabilities: np.ndarray, bounds: tuple[float, float] = (0.25, 4.0)
) -> float:
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
