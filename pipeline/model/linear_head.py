"""The linear head (``model.head.dense_units: 0``) as the optimum of its convex problem.

Standardize -> softmax on frozen features is multinomial logistic regression: one convex problem
per strength of L2 regularization, which L-BFGS solves to its optimum (scikit-learn's
``LogisticRegression``), the same answer whatever the seed. The strength is chosen on the val
split: a path of strengths from strong to weak, each solve warm-started from the one before, the
strength with the lowest val log loss kept. The path ends ``PATIENCE`` strengths after the val loss
last improved, the way early stopping ends epochs (weaker strengths only fit the training rows
closer, and cost more iterations).

``l2`` is the strength per training row, as Keras's ``regularizers.L2`` has it: the problem is
mean(class weight x log loss) + l2 x |kernel|^2, i.e. scikit-learn's ``C = 1 / (2 l2 n)`` for n rows.
Measured on MobileNetV2 features (bench/head_quality.py's rows, 3 draws each), the kept strength
ran from 1 (flowers, 6 training images per class) through 0.018 (the whole flowers archive) to 1e-4
(two flower classes, 22 training and 4 val images each): the grid spans that with a decade to spare
at either end.

The solution is a kernel and bias on the standardized features, which go into the head's
``probabilities`` layer as they are (``networks.head``): the exported model keeps its shape.
"""

import time
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from threadpoolctl import threadpool_limits

L2_GRID = tuple(10.0 ** (1 - k / 4) for k in range(25))  # 10 down to 1e-5, four strengths per decade
PATIENCE = 3  # strengths tried past the best val log loss before the path ends
# L-BFGS stops when no gradient component is larger (scikit-learn's default). 1e-6 took 3x the time
# on the flowers for val log losses equal to 4 decimals and the same test accuracy +-0.002.
TOLERANCE = 1e-4
MAX_ITERATIONS = 1000  # per strength (the flowers need 15-35 from the warm start)


@dataclass(frozen=True)
class Step:
    """One strength ``l2`` of the path: its optimum's scores on the training and val rows (log loss
    unweighted, as Keras's ``val_loss``), the seconds its solve took and whether L-BFGS converged."""

    l2: float
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    converged: bool


@dataclass(frozen=True)
class Solution:
    """The path, and the kernel (features x classes) and bias of the step with the lowest val log
    loss (the stronger strength on a tie), on standardized features."""

    path: list[Step]
    chosen: Step
    kernel: np.ndarray
    bias: np.ndarray


def standardized(rows: np.ndarray, mean: np.ndarray, variance: np.ndarray, chunk_rows: int = 4096) -> np.ndarray:
    """``(rows - mean) / sqrt(variance)`` in float32, read a chunk at a time from a memory-mapped array.
    The solver needs this one copy of the training rows in memory (rows x features x 4 bytes: 45 MB
    for the flowers' 8,794 rows of 1,280 features); float32 solves in 0.6 of float64's time, to the
    same val log loss (4 decimals)."""
    scale = np.sqrt(variance)
    out = np.empty(rows.shape, dtype="float32")
    for start in range(0, len(rows), chunk_rows):
        out[start : start + chunk_rows] = (np.asarray(rows[start : start + chunk_rows], "float64") - mean) / scale
    return out


def softmax_weights(model: LogisticRegression, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The fitted model as a softmax layer's kernel (features x classes) and bias. With two classes
    scikit-learn fits one logit z for class 1; softmax of (-z/2, z/2) is the same probability."""
    if len(model.classes_) != n_classes:  # the prepare stage puts every class in train
        raise ValueError(f"training rows hold {len(model.classes_)} of {n_classes} classes")
    if n_classes == 2:
        return np.stack([-model.coef_[0], model.coef_[0]], axis=1) / 2, np.array([-1.0, 1.0]) * model.intercept_[0] / 2
    return model.coef_.T, model.intercept_


def scores(model: LogisticRegression, x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[float, float]:
    """Log loss and accuracy of ``model`` on (x, y)."""
    probabilities = model.predict_proba(x)
    return log_loss(y, probabilities, labels=range(n_classes)), float(np.mean(probabilities.argmax(axis=1) == y))


def regularization_path(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    class_weight: dict[int, float] | None,
    grid: tuple[float, ...] = L2_GRID,
    patience: int = PATIENCE,
) -> Solution:
    """The optimum at each strength of ``grid`` (strongest first) on standardized features, until
    ``patience`` strengths have passed without a lower val log loss; the best of them."""
    model = LogisticRegression(tol=TOLERANCE, max_iter=MAX_ITERATIONS, class_weight=class_weight, warm_start=True)
    path: list[Step] = []
    chosen = 0
    for l2 in grid:
        started = time.perf_counter()
        model.set_params(C=1 / (2 * l2 * len(y_train)))
        # One BLAS thread: the same sums on any number of cores, and faster on a busy machine, as
        # these matrices are too thin to share out (flowers: 6 s; 2 threads on 2 busy cores: 60 s+).
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(1):
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x_train, y_train)
        path.append(
            Step(
                l2,
                *scores(model, x_train, y_train, n_classes),
                *scores(model, x_val, y_val, n_classes),
                time.perf_counter() - started,
                converged=not any(issubclass(w.category, ConvergenceWarning) for w in caught),
            )
        )
        if len(path) == 1 or path[-1].val_loss < path[chosen].val_loss:
            chosen, weights = len(path) - 1, softmax_weights(model, n_classes)
        elif len(path) - 1 - chosen >= patience:
            break
    return Solution(path, path[chosen], *weights)
