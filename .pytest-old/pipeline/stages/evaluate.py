"""Stage 6, evaluate: score the exported model on the test split, draw the plots, gate on accuracy.

Inputs: ``data/model/`` (``model.keras``, ``labels.json``), ``eval/history.csv`` and the test images of
``data/augmented`` (resized and center-cropped, never randomly changed).
Outputs in ``eval/`` (small, meant for git):
- ``metrics.json``: accuracy, top-k accuracy (k capped at the number of classes), log loss, expected
  calibration error, macro and weighted precision/recall/F1, per-class precision/recall/F1/support
  under the class names (``dvc metrics show``);
- ``predictions.csv``: one row per test image (DVC's confusion-matrix plot reads it);
- ``plots/``: confusion matrices (counts, row-normalized), reliability diagram, training curves,
  the most confident mistakes, and Grad-CAM overlays.
And ``data/test_probabilities.npz``, every probability, which export checks its formats against
(so the test images go through the Keras model once per run, here).
Everything is also logged to the pipeline run in MLflow (per-class metrics under keys made by
``tracking.class_keys``, as class names may hold anything a folder name can), the test metrics
also on the run's logged models. With ``evaluate.min_accuracy`` set, the stage fails (after writing
all of the above) when test accuracy is below it; otherwise (and always when it is null) the run's
registered versions become ``@champion``, the alias ``make serve`` serves.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cli import UserError, run_stage
from pipeline.config import load_config
from pipeline.data.manifests import image_batches, read_labels, test_images, write_manifest, write_test_probabilities
from pipeline.files import atomic_dir, write_json
from pipeline.model import networks
from pipeline.paths import (
    AUGMENT_GALLERY,
    AUGMENTED_DIR,
    DATA_REPORT,
    DOWNLOAD_REPORT,
    EVAL_DIR,
    HISTORY,
    LABEL_ISSUES_GALLERY,
    LABEL_ISSUES_REPORT,
    METRICS,
    MODEL_FILE,
    MODEL_LABELS,
    PLOTS_DIR,
    PREDICTIONS,
    PREPARED_DIR,
)
from pipeline.report import gradcam, metrics, plots, tracking

TOP_LOSSES = 12
GRADCAM_PER_CLASS = 2
GRADCAM_IMAGES = 24  # at most: with many classes, one image for each of the first 24 classes
TITLE_LABEL_CHARACTERS = 14  # two class names and a probability fit over a grid image
EXTRA_ARTIFACTS = [DATA_REPORT, DOWNLOAD_REPORT, AUGMENT_GALLERY, MODEL_LABELS, HISTORY, PREPARED_DIR / "quarantine.csv",
                   PREPARED_DIR / "ignored.csv", LABEL_ISSUES_REPORT, LABEL_ISSUES_GALLERY]


def load_images(paths: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(AUGMENTED_DIR / p).convert("RGB")) for p in paths])


def most_confident_mistakes(y_true: np.ndarray, probabilities: np.ndarray, n: int) -> np.ndarray:
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != y_true)
    return wrong[np.argsort(-probabilities[wrong].max(axis=1))][:n]


def gradcam_examples(y_true: np.ndarray) -> np.ndarray:
    """The first GRADCAM_PER_CLASS test images of each class, fewer per class (at least one) and
    fewer classes when that would exceed GRADCAM_IMAGES."""
    classes = np.unique(y_true)
    per_class = min(GRADCAM_PER_CLASS, max(1, GRADCAM_IMAGES // len(classes)))
    return np.array([i for c in classes[:GRADCAM_IMAGES] for i in np.flatnonzero(y_true == c)[:per_class]], dtype=int)


def draw_plots(model, rows, y_true, probabilities, labels, report, out: Path,
               chosen: np.ndarray, chosen_maps: np.ndarray) -> None:
    """Every plot of ``plots/``; ``chosen``: the images shown with Grad-CAM, ``chosen_maps`` their feature maps."""
    y_pred = probabilities.argmax(axis=1)
    plots.confusion_matrices(y_true, y_pred, labels, out)
    plots.reliability_diagram(*metrics.reliability(y_true, probabilities), report["ece"], out / "reliability.png")
    if HISTORY.is_file():
        plots.training_curves(HISTORY, out / "training_curves.png")

    names = [plots.short(label, TITLE_LABEL_CHARACTERS) for label in labels]
    mistakes = most_confident_mistakes(y_true, probabilities, TOP_LOSSES)
    plots.image_grid(
        list(load_images([rows[i].path for i in mistakes])) if len(mistakes) else [],
        [f"{names[y_true[i]]} → {names[y_pred[i]]} ({probabilities[i].max():.2f})" for i in mistakes],
        out / "top_losses.png",
        heading=f"The {len(mistakes)} most confident mistakes: true → predicted (probability)",
    )
    shown_classes = len(np.unique(y_true[chosen]))
    plots.image_grid(
        list(load_images([rows[i].path for i in chosen])),
        [f"{names[y_true[i]]}: pred {names[y_pred[i]]}" for i in chosen],
        out / "gradcam.png",
        overlays=list(gradcam.heatmaps(model, chosen_maps, y_pred[chosen])),
        heading=f"Grad-CAM of the predicted class, {shown_classes} of {len(labels)} classes",
    )


def main() -> None:
    cfg = load_config()
    if not MODEL_FILE.is_file():
        raise UserError(f"{MODEL_FILE} is missing: run the train stage first (dvc repro)")
    labels = read_labels(MODEL_LABELS)
    rows = test_images()
    model = networks.load(MODEL_FILE)
    paths = [str(AUGMENTED_DIR / r.path) for r in rows]
    y_true = np.array([labels.index(r.label) for r in rows])
    # One pass of the test images through the model: every probability, and the backbone's
    # feature maps of the images the Grad-CAM plot shows.
    chosen = gradcam_examples(y_true)
    probabilities, chosen_maps = gradcam.predict_with_maps(model, image_batches(paths, cfg.train.batch_size), chosen)
    report = metrics.classification_report(y_true, probabilities, labels, cfg.evaluate.top_k)
    if report["top_k"] < cfg.evaluate.top_k:
        print(f"evaluate: evaluate.top_k {cfg.evaluate.top_k} is more than the {len(labels)} classes; "
              f"reporting top_{report['top_k']}_accuracy")

    EVAL_DIR.mkdir(exist_ok=True)
    write_json(METRICS, report)
    write_test_probabilities(probabilities, paths)
    write_manifest(PREDICTIONS, ["path", "actual", "predicted", "confidence"],
                   [[r.path, labels[t], labels[p.argmax()], f"{p.max():.4f}"]
                    for r, t, p in zip(rows, y_true, probabilities, strict=True)])
    with atomic_dir(PLOTS_DIR) as out:
        draw_plots(model, rows, y_true, probabilities, labels, report, out, chosen, chosen_maps)

    recorded = tracking.recorded_run()
    with tracking.resume_run(recorded):
        tracking.log_test_metrics(report, [model["model_id"] for model in recorded["models"].values()],
                                  tracking.logged_dataset(recorded["run_id"], "test"))
        tracking.log_plots(PLOTS_DIR)
        tracking.log_reports([METRICS, PREDICTIONS, *EXTRA_ARTIFACTS])

    print(f"evaluate: test accuracy {report['accuracy']:.3f} on {len(rows)} images "
          f"(macro F1 {report['macro']['f1']:.3f}); plots in {PLOTS_DIR}")
    gate = cfg.evaluate.min_accuracy
    if gate is not None and report["accuracy"] < gate:
        raise UserError(f"test accuracy {report['accuracy']:.4f} is below evaluate.min_accuracy {gate}; "
                        "@champion stays where it was")
    promoted = tracking.promote(recorded)
    if promoted:
        print(f"evaluate: @champion is now {', '.join(promoted)}")


if __name__ == "__main__":
    run_stage(main)
