"""Stage 6, evaluate: score the exported model on the test split.

Inputs: ``data/model/model.keras`` and the test images of ``data/augmented`` (resized and
center-cropped, never randomly changed). Outputs in ``eval/`` (small, meant for git):
``metrics.json`` (``dvc metrics show``), ``predictions.csv`` (DVC's confusion-matrix plot) and
``plots/confusion_matrix.png``. The same figures are logged to the training run in MLflow.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
import mlflow
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score

from pipeline import models, tracking
from pipeline.cli import UserError, run_stage
from pipeline.config import load_config
from pipeline.data import AUGMENTED_DIR, MODEL_DIR, image_batches, read_labels, read_manifest, write_manifest
from pipeline.files import write_json

EVAL_DIR = Path("eval")


def test_rows() -> list[dict[str, str]]:
    return [r for r in read_manifest(AUGMENTED_DIR / "manifest.csv") if r["split"] == "test" and r["copy"] == "0"]


def plot_confusion(actual: list[str], predicted: list[str], labels: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2))
    ConfusionMatrixDisplay.from_predictions(actual, predicted, labels=labels, ax=ax, colorbar=False,
                                            xticks_rotation=45)
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    cfg = load_config()
    model_path = MODEL_DIR / "model.keras"
    if not model_path.is_file():
        raise UserError(f"{model_path} is missing: run the train stage first (dvc repro)")
    labels = read_labels(MODEL_DIR / "labels.json")
    rows = test_rows()
    model = models.load(model_path)
    probabilities = model.predict(image_batches([str(AUGMENTED_DIR / r["path"]) for r in rows],
                                                cfg.train.batch_size), verbose=0)
    actual = [r["label"] for r in rows]
    predicted = [labels[i] for i in np.argmax(probabilities, axis=1)]
    metrics = {"accuracy": round(float(accuracy_score(actual, predicted)), 4), "test_images": len(rows)}
    write_json(EVAL_DIR / "metrics.json", metrics)
    write_manifest(EVAL_DIR / "predictions.csv", ["path", "actual", "predicted"],
                   [[r["path"], a, p] for r, a, p in zip(rows, actual, predicted, strict=True)])
    plot_path = EVAL_DIR / "plots" / "confusion_matrix.png"
    plot_confusion(actual, predicted, labels, plot_path)
    with tracking.resume_recorded_run():
        mlflow.log_metric("test_accuracy", metrics["accuracy"])
        mlflow.log_artifact(str(plot_path), artifact_path="plots")
        mlflow.log_artifact(str(EVAL_DIR / "metrics.json"))
    print(f"evaluate: test accuracy {metrics['accuracy']:.3f} on {len(rows)} images")


if __name__ == "__main__":
    run_stage(main)
