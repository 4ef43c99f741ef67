"""Stage 6, evaluate: score the served model on the test split's original files, draw the plots, gate on accuracy.

Inputs: ``data/model/`` (``model.keras``, ``after_backbone.keras``, ``labels.json``), ``eval/history.csv``, and the test split
of ``data/prepared/manifest.csv``: each image's original file in ``data/raw``, the bytes a user would
send. Each becomes the model's input through the model server's own function
(``serving.request_image_input``: pipeline/data/images.py ``model_input``), so the metrics reported
are those the served model, ``make predict`` and the exported files give on the same files. A
model whose backbone was not fine-tuned has the features stage's backbone, which already ran on
these files so (``data/features/served_test.npz``): the model's layers after the backbone
(``after_backbone.keras``, without loading the backbone) then score them, and export's parity
check runs the whole exported model on the same files against what this stage recorded.
Outputs in ``eval/`` (small, meant for git):
- ``metrics.json``: accuracy, top-k accuracy (k capped at the number of classes), log loss, expected
  calibration error, macro and weighted precision/recall/F1, per-class precision/recall/F1/support
  under the class names (``dvc metrics show``);
- ``predictions.csv``: one row per test image (DVC's confusion-matrix plot reads it);
- ``plots/``: confusion matrices (counts, row-normalized), reliability diagram, training curves,
  the most confident mistakes, and Grad-CAM overlays;
- ``report.html``: the run on one page, offline (pipeline/report/html.py).
And ``data/test_probabilities.npz``, every probability keyed by the file's path, which export checks
its formats against (so the test images go through the Keras model once per run, here).
Everything is also logged to the pipeline run in MLflow (per-class metrics under keys made by
``tracking.class_keys``, as class names may hold anything a folder name can), the test metrics
also on the run's logged models; accuracy and macro F1 come with 95 % intervals (a warning when
the test split is too small for +-5 points), and each registered version gets them as tags. With
``evaluate.min_accuracy`` set, the stage fails (after writing all of the above) when test accuracy
is below it. Otherwise the run's registered versions become ``@champion``, the alias ``make serve``
serves, when they beat the champion on ``mlflow.champion_metric`` on the same prepared data (or
there is none yet); else they stay ``@candidate`` and the stage says why in one line
(``make promote`` ships them anyway).
"""

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from pipeline import serving
from pipeline.cli import UserError, run_stage
from pipeline.config import Config, load_config
from pipeline.data.manifests import read_labels, split_files, write_manifest, write_test_probabilities
from pipeline.files import atomic_dir, write_json
from pipeline.model import feature_store, networks
from pipeline.paths import (
    AFTER_BACKBONE_FILE,
    AUGMENT_GALLERY,
    DATA_REPORT,
    DOWNLOAD_REPORT,
    EVAL_DIR,
    FEATURES_DIR,
    HISTORY,
    LABEL_ISSUES_GALLERY,
    LABEL_ISSUES_REPORT,
    METRICS,
    MODEL_FILE,
    MODEL_LABELS,
    PLOTS_DIR,
    PREDICTIONS,
    PREPARED_DIR,
    REPORT,
)
from pipeline.report import gradcam, html, metrics, plots, tracking

TOP_LOSSES = 12
TITLE_LABEL_CHARACTERS = 14  # two class names and a probability fit over a grid image
TITLE_FILE_CHARACTERS = 28  # a file name (the middle cut out) fits over a grid image
EXTRA_ARTIFACTS = [
    DATA_REPORT,
    DOWNLOAD_REPORT,
    AUGMENT_GALLERY,
    MODEL_LABELS,
    HISTORY,
    PREPARED_DIR / "quarantine.csv",
    PREPARED_DIR / "ignored.csv",
    LABEL_ISSUES_REPORT,
    LABEL_ISSUES_GALLERY,
]


Pixels = Callable[[int], np.ndarray]  # test image index -> the model's input


def most_confident_mistakes(y_true: np.ndarray, probabilities: np.ndarray, n: int) -> np.ndarray:
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != y_true)
    return wrong[np.argsort(-probabilities[wrong].max(axis=1))][:n]


def draw_plots(
    model,
    pixels: Pixels,
    files: list[str],
    y_true,
    probabilities,
    labels,
    report,
    out: Path,
    chosen: np.ndarray,
    chosen_maps: np.ndarray,
) -> None:
    """Every plot of ``plots/``; ``pixels``: a test image as the model saw it; ``files``: each one's
    name in the source; ``chosen``: the images shown with Grad-CAM, ``chosen_maps`` their feature maps."""
    y_pred = probabilities.argmax(axis=1)
    plots.confusion_matrices(y_true, y_pred, labels, out)
    plots.reliability_diagram(*metrics.reliability(y_true, probabilities), report["ece"], out / "reliability.png")
    if HISTORY.is_file():
        plots.training_curves(HISTORY, out / "training_curves.png")

    names = [plots.short(label, TITLE_LABEL_CHARACTERS) for label in labels]
    mistakes = most_confident_mistakes(y_true, probabilities, TOP_LOSSES)
    plots.image_grid(
        [pixels(i) for i in mistakes],
        [
            f"{plots.short(files[i], TITLE_FILE_CHARACTERS)}\n{names[y_true[i]]} → {names[y_pred[i]]} "
            f"({probabilities[i].max():.2f})"
            for i in mistakes
        ],
        out / "top_losses.png",
        heading=f"The {len(mistakes)} most confident mistakes: file, true → predicted (probability)",
    )
    shown_classes = len(np.unique(y_true[chosen]))
    plots.image_grid(
        [pixels(i) for i in chosen],
        [f"{names[y_true[i]]}: pred {names[y_pred[i]]}" for i in chosen],
        out / "gradcam.png",
        overlays=list(gradcam.heatmaps(model, chosen_maps, y_pred[chosen])),
        heading=f"Grad-CAM of the predicted class, {shown_classes} of {len(labels)} classes",
    )


def scored(cfg: Config, paths: list[str], chosen: np.ndarray) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """The model from the backbone's last feature maps on (for Grad-CAM), the model's probabilities
    on the test files as served, and the backbone's feature maps of the ``chosen`` images. Without
    fine-tuning the backbone is the features stage's, which ran it on these files as served
    (``feature_store.served_test``): the layers after it (``after_backbone.keras``, if it goes with
    ``model.keras`` and the store's backbone as they are now) then finish the job, and the backbone
    is not even loaded. Otherwise one pass of the files through the whole model."""
    cached = None if cfg.train.fine_tune.enabled else feature_store.served_test(paths)
    if cached is not None and np.array_equal(cached.examples, chosen):
        lineage = networks.after_backbone_lineage(MODEL_FILE, FEATURES_DIR / feature_store.BACKBONE_WEIGHTS)
        after = networks.load_after_backbone(AFTER_BACKBONE_FILE, lineage)
        if after is not None:
            head, size = networks.head_of(after), cfg.train.batch_size
            # Called batch by batch: predict() would build a tf.data pipeline and trace the head
            # first (~0.25 s), for a few small matrix products per batch.
            chunks = (cached.features[start : start + size] for start in range(0, len(cached.features), size))
            probabilities = np.concatenate([keras.ops.convert_to_numpy(head(c, training=False)) for c in chunks])
            return after, probabilities, cached.maps
    model = networks.load(MODEL_FILE)
    batches = serving.file_batches(paths, networks.input_size(model), cfg.train.batch_size)
    return model, *gradcam.predict_with_maps(model, batches, chosen)


def main() -> None:
    cfg = load_config()
    if not MODEL_FILE.is_file():
        raise UserError(f"{MODEL_FILE} is missing: run the train stage first (dvc repro)")
    labels = read_labels(MODEL_LABELS)
    rows, paths = split_files("test")
    y_true = np.array([labels.index(r.label) for r in rows])
    chosen = gradcam.examples(y_true)
    model, probabilities, chosen_maps = scored(cfg, paths, chosen)
    report = metrics.classification_report(y_true, probabilities, labels, cfg.evaluate.top_k)
    if report["top_k"] < cfg.evaluate.top_k:
        print(
            f"evaluate: evaluate.top_k {cfg.evaluate.top_k} is more than the {len(labels)} classes; "
            f"reporting top_{report['top_k']}_accuracy"
        )

    EVAL_DIR.mkdir(exist_ok=True)
    write_json(METRICS, report)
    write_test_probabilities(probabilities, paths)
    write_manifest(
        PREDICTIONS,
        ["path", "actual", "predicted", "confidence"],
        [
            [path, labels[t], labels[p.argmax()], f"{p.max():.4f}"]
            for path, t, p in zip(paths, y_true, probabilities, strict=True)
        ],
    )
    with atomic_dir(PLOTS_DIR) as out:
        draw_plots(
            model,
            lambda i: serving.file_input(paths[i], i, cfg.model.input_size),
            [r.source for r in rows],
            y_true,
            probabilities,
            labels,
            report,
            out,
            chosen,
            chosen_maps,
        )
    html.write_report(cfg, REPORT)

    recorded = tracking.recorded_run()
    with tracking.resume_run(recorded):
        tracking.log_test_metrics(
            report,
            [model["model_id"] for model in recorded["models"].values()],
            tracking.logged_dataset(recorded["run_id"], "test"),
        )
        tracking.log_plots(PLOTS_DIR)
        tracking.log_reports([METRICS, PREDICTIONS, REPORT, *EXTRA_ARTIFACTS])
    tracking.tag_versions(recorded["models"], tracking.scored_tags(report))

    interval = report["accuracy_ci95"]
    print(
        f"evaluate: test accuracy {report['accuracy']:.3f} (95 % interval {interval['low']:.3f}-"
        f"{interval['high']:.3f}) on {report['test_images']} images (macro F1 {report['macro']['f1']:.3f}); plots in {PLOTS_DIR}"
    )
    warning = metrics.interval_warning(report)
    if warning:
        print(f"evaluate: {warning}")
    gate = cfg.evaluate.min_accuracy
    if gate is not None and report["accuracy"] < gate:
        raise UserError(
            f"test accuracy {report['accuracy']:.4f} is below evaluate.min_accuracy {gate}; "
            "@champion stays where it was"
        )
    ship(recorded, report, cfg.mlflow.champion_metric)


def ship(recorded: dict, report: dict, metric: str) -> None:
    """Move @champion to the run's versions when they beat it (tracking.champion_stays); else say in
    one line why they stay @candidate, and how to ship them anyway."""
    reason = tracking.champion_stays(recorded, report, metric)
    if reason is None:
        promoted = tracking.promote(recorded)
        if promoted:
            print(f"evaluate: @champion is now {', '.join(promoted)}")
        return
    experiment = tracking.dvc_experiment()
    print(
        f"evaluate: this run's versions stay @candidate: {reason}; "
        f"make promote{f' EXP={experiment}' if experiment else ''} ships them"
    )


if __name__ == "__main__":
    run_stage(main)
