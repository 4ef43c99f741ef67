"""Evaluation figures, written as PNG files (DVC renders them with `dvc plots show`, MLflow stores them)."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import font_manager
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay

MATRIX_INCHES = 18  # a confusion matrix's cells span at most this (1,800 px at 100 dpi), whatever the classes
CELL_VALUES_UP_TO = 25  # classes; with more, numbers would not fit their cells: colour only, with a colour bar
TICK_LABELS_UP_TO = 120  # classes named one by one on the axes; with more, every n-th
LABEL_CHARACTERS = 30  # class names are cut to this in tick labels and titles
CJK_FONT = "NotoSansCJK-Regular"  # Noto Sans CJK (Debian: fonts-noto-cjk), for class names in Chinese, Japanese, Korean


def use_cjk_fallback() -> None:
    """Draw characters DejaVu Sans lacks (猫, 犬, 고양이) with Noto Sans CJK where the system has it,
    instead of empty boxes; without it matplotlib warns once per missing glyph, as before."""
    files = [f for f in font_manager.findSystemFonts() if CJK_FONT in f]
    if files:
        font_manager.fontManager.addfont(files[0])
        plt.rcParams["font.family"] = ["DejaVu Sans", font_manager.FontProperties(fname=files[0]).get_name()]


use_cjk_fallback()


def short(label: str, width: int = LABEL_CHARACTERS) -> str:
    """A class name fit for a figure: one line, at most ``width`` characters (the middle cut out:
    long names often differ at the end), ``$`` kept literal (matplotlib reads text between two
    ``$`` as math, and fails on some)."""
    text = " ".join(label.split())
    if len(text) > width:
        head = (width - 1) // 2
        text = f"{text[:head]}…{text[head + 1 - width :]}"
    return text.replace("$", r"\$")


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrices(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], out_dir: Path) -> list[Path]:
    """Counts, and rows normalized to 1 (recall per class on the diagonal).

    Cells shrink with the number of classes so that the figure stays within ``MATRIX_INCHES``
    (plus room for the names); past ``CELL_VALUES_UP_TO`` classes they show colour only, past
    ``TICK_LABELS_UP_TO`` every n-th class is named (the order is ``labels.json``'s).
    """
    n = len(labels)
    cell = min(1.1, MATRIX_INCHES / n)  # inches per class
    step = -(-n // TICK_LABELS_UP_TO)
    fontsize = min(10, max(5, 0.6 * 72 * cell * step))  # points: most of a labelled row's height
    with_values = n <= CELL_VALUES_UP_TO
    ticks = range(0, n, step)
    names = [short(labels[i]) for i in ticks]
    paths = []
    for normalize, name, title in (
        (None, "confusion_matrix.png", "Test confusion matrix (counts)"),
        ("true", "confusion_matrix_normalized.png", "Test confusion matrix (row-normalized)"),
    ):
        fig, ax = plt.subplots(figsize=(cell * n + 3, cell * n + 2))
        display = ConfusionMatrixDisplay.from_predictions(
            y_true,
            y_pred,
            labels=range(n),
            normalize=normalize,
            include_values=with_values,
            values_format=".2f" if normalize else "d",
            ax=ax,
            colorbar=False,
        )
        if not with_values:  # a slim bar as tall as the matrix, which then keeps most of the figure
            fig.colorbar(
                display.im_, ax=ax, fraction=0.046, pad=0.02, ticks=None if normalize else MaxNLocator(integer=True)
            )  # counts: whole numbers
        ax.set_xticks(
            ticks, names, fontsize=fontsize, rotation=45 if with_values else 90, ha="right", rotation_mode="anchor"
        )
        ax.set_yticks(ticks, names, fontsize=fontsize)
        ax.set_title(title if step == 1 else f"{title}; one class in {step} named")
        _save(fig, out_dir / name)
        paths.append(out_dir / name)
    return paths


def reliability_diagram(
    confidence: np.ndarray, accuracy: np.ndarray, counts: np.ndarray, ece: float, path: Path
) -> None:
    bins = len(counts)
    centers = (np.arange(bins) + 0.5) / bins
    filled = counts > 0
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(centers[filled], accuracy[filled], width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(confidence[filled], accuracy[filled], "o", color="black", label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"Reliability (ECE {ece:.3f})")
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
                    ax.plot(
                        epochs, [float(r[key]) for r in part], style, color=color, marker=".", label=f"{key} ({phase})"
                    )
        ax.set(xlabel="epoch", title=metric)
        ax.legend()
    _save(fig, path)


def image_grid(
    images: list[np.ndarray],
    titles: list[str],
    path: Path,
    overlays: list[np.ndarray] | None = None,
    columns: int = 6,
    heading: str | None = None,
) -> None:
    """Images with titles (callers bound how many); optional heatmaps (values 0..1, any size) drawn over them."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.3 * columns, 2.5 * rows + (0.4 if heading else 0)), squeeze=False
    )
    if heading:
        fig.suptitle(heading)
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
    if overlays is None:
        _save(fig, path)
    else:
        _save_with_scale(fig, axes, path)


def _save_with_scale(fig: plt.Figure, axes: np.ndarray, path: Path) -> None:
    """A heatmap grid with its colour scale: 1 = the image's strongest evidence for the class."""
    fig.tight_layout()
    fig.colorbar(
        ScalarMappable(Normalize(0, 1), cmap="jet"),
        ax=axes,
        shrink=0.6,
        pad=0.01,
        label="evidence for the class, relative to the image's strongest",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
