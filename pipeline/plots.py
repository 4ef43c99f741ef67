"""Evaluation figures, written as PNG files (DVC renders them with `dvc plots show`, MLflow stores them)."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrices(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], out_dir: Path) -> list[Path]:
    """Counts, and rows normalized to 1 (recall per class on the diagonal)."""
    paths = []
    for normalize, name, title in ((None, "confusion_matrix.png", "Test confusion matrix (counts)"),
                                   ("true", "confusion_matrix_normalized.png", "Test confusion matrix (row-normalized)")):
        side = 1.1 * len(labels) + 3
        fig, ax = plt.subplots(figsize=(side, side - 1))
        ConfusionMatrixDisplay.from_predictions(
            y_true, y_pred, labels=range(len(labels)), display_labels=labels, normalize=normalize,
            values_format=".2f" if normalize else "d", ax=ax, colorbar=False, xticks_rotation=45,
        )
        ax.set_title(title)
        _save(fig, out_dir / name)
        paths.append(out_dir / name)
    return paths


def reliability_diagram(confidence: np.ndarray, accuracy: np.ndarray, counts: np.ndarray, ece: float,
                        path: Path) -> None:
    bins = len(counts)
    centers = (np.arange(bins) + 0.5) / bins
    filled = counts > 0
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(centers[filled], accuracy[filled], width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(confidence[filled], accuracy[filled], "o", color="black", label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"Reliability (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    _save(fig, path)


def training_curves(history_csv: Path, path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, one line style per training phase."""
    with open(history_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    phases = sorted({r.get("phase", "head") for r in rows}, key=[r.get("phase", "head") for r in rows].index)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for phase, style in zip(phases, ("-", "--", ":"), strict=False):
            part = [r for r in rows if r.get("phase", "head") == phase]
            epochs = [int(r["epoch"]) for r in part]
            for key, color in ((metric, "tab:blue"), (f"val_{metric}", "tab:orange")):
                if key in part[0]:
                    ax.plot(epochs, [float(r[key]) for r in part], style, color=color, marker=".",
                            label=f"{key} ({phase})")
        ax.set(xlabel="epoch", title=metric)
        ax.legend()
    _save(fig, path)


def image_grid(images: list[np.ndarray], titles: list[str], path: Path, overlays: list[np.ndarray] | None = None,
               columns: int = 6) -> None:
    """Images with titles; optional heatmaps (values 0..1, any size) drawn over them."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image, title) in enumerate(zip(axes.flat, images, titles, strict=False)):
        ax.imshow(image)
        if overlays is not None:
            height, width = image.shape[:2]
            ax.imshow(overlays[i], cmap="jet", alpha=0.4, extent=(0, width, height, 0), interpolation="bilinear")
        ax.set_title(title, fontsize=8)
    if not images:
        axes.flat[0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    _save(fig, path)
