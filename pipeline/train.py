"""Stage 5, train: fit a new classification head on the cached backbone features.

Input: ``data/features`` (features, labels, and the frozen extractor that made them).
Outputs in ``data/model/``: ``model.keras`` (raw uint8 images of any size -> class probabilities),
``labels.json``, ``history.csv`` (per-epoch metrics) and ``mlflow_run.json``.
The run is logged to MLflow: every param, per-epoch metrics, and the model with its signature,
registered under ``mlflow.registered_model_name``.
"""

import csv
import shutil
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline import models, tracking
from pipeline.cli import UserError, run_stage
from pipeline.config import Config, load_config
from pipeline.data import FEATURES_DIR, MODEL_DIR, PREPARED_DIR, read_labels
from pipeline.files import atomic_dir, atomic_file


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(FEATURES_DIR / f"{split}.npy", mmap_mode="r"), np.load(FEATURES_DIR / f"{split}_labels.npy")


def fit_head(cfg: Config, n_classes: int) -> tuple[keras.Model, keras.callbacks.History]:
    x_train, y_train = load_split("train")
    x_val, y_val = load_split("val")
    head = models.head(x_train, n_classes, cfg.model.dropout)
    head.compile(
        optimizer=keras.optimizers.Adam(cfg.train.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = head.fit(
        x_train, y_train,
        validation_data=(x_val, y_val),
        epochs=cfg.train.epochs,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        callbacks=[tracking.log_epoch_metrics()],
        verbose=2,
    )
    return head, history


def write_history(history: keras.callbacks.History, path: Path) -> None:
    names = list(history.history)
    with atomic_file(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", *names])
        for epoch in range(len(history.epoch)):
            writer.writerow([epoch + 1, *(f"{history.history[n][epoch]:.6f}" for n in names)])


def main() -> None:
    cfg = load_config()
    if not (FEATURES_DIR / "meta.json").is_file():
        raise UserError(f"{FEATURES_DIR} is missing: run the features stage first (dvc repro)")
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()  # same seed on CPU -> same metrics
    labels = read_labels()
    with tracking.start_new_run(cfg.mlflow.experiment_name) as run, atomic_dir(MODEL_DIR) as out:
        mlflow.log_params(cfg.flat())
        head, history = fit_head(cfg, len(labels))
        model = models.classifier(models.load(FEATURES_DIR / "extractor.keras"), head, cfg.model.input_size)
        model.save(out / "model.keras")
        shutil.copy(PREPARED_DIR / "labels.json", out / "labels.json")
        write_history(history, out / "history.csv")
        mlflow.log_artifact(str(out / "labels.json"))
        tracking.log_model(model, len(labels), cfg.mlflow.registered_model_name)
        tracking.record_run(run, out)
    print(f"train: val accuracy {history.history['val_accuracy'][-1]:.3f}; model in {MODEL_DIR}, "
          f"MLflow run {run.info.run_id}")


if __name__ == "__main__":
    run_stage(main)
