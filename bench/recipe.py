"""The keras.io transfer-learning recipe, the contender of our pipeline in the benchmarks.

As a user writes it (https://keras.io/guides/transfer_learning/): ``image_dataset_from_directory``
on class folders, a frozen ``keras.applications`` backbone behind Keras augmentation layers (flip,
zoom, brightness, contrast) inside the model, a dropout + softmax head, and ``model.fit``, in
float32. It trains and validates on our prepare stage's split (``split_folders`` links the same
images), so its accuracies compare with ours image for image.

``run`` starts it as its own Python process, as a user runs a script: its wall time includes the
Python + TensorFlow start-up, like each of our stages'. With ``test=True`` it also predicts the
test images after every epoch and records the elapsed wall time since the process was launched
(imports included, the test predictions themselves left out): the time it takes to reach a test
accuracy.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import manifest_rows, stage_env

AUGMENTATION_ZOOM = (-0.25, 0.0)  # zoom in up to 25 %: about our augment.crop_scale 0.6..1


def split_folders(workdir: Path, splits: tuple[str, ...]) -> Path:
    """``recipe/<split>/<class>/``: links to the prepared images of our split, for ``splits``."""
    root = workdir / "recipe"
    shutil.rmtree(root, ignore_errors=True)
    for row in manifest_rows(workdir / "data/prepared/manifest.csv"):
        if row["split"] in splits:
            source = workdir / "data/prepared" / row["path"]
            target = root / row["split"] / row["label"] / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source, target)
    return root


def recipe(
    folders: Path,
    application: str,
    weights: str | None,
    size: int,
    epochs: int,
    batch_size: int,
    seed: int,
    launched: float,
    test: bool,
) -> dict:
    """Train the recipe on ``folders``/train, validating on ``folders``/val; with ``test``, the test
    accuracy after each epoch and the final test metrics (pipeline.report.metrics, as our evaluate stage)."""
    import keras
    import numpy as np

    from pipeline.report.metrics import classification_report

    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    options = {"image_size": (size, size), "batch_size": batch_size, "crop_to_aspect_ratio": True, "seed": seed}
    train = keras.utils.image_dataset_from_directory(folders / "train", shuffle=True, **options)
    val = keras.utils.image_dataset_from_directory(folders / "val", shuffle=False, **options)
    network = getattr(keras.applications, application)
    preprocess = getattr(keras.applications, network.__module__.split(".")[-1]).preprocess_input
    base = network(include_top=False, weights=weights, input_shape=(size, size, 3))
    base.trainable = False
    augmentation = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomZoom(AUGMENTATION_ZOOM),
            keras.layers.RandomBrightness(0.2),
            keras.layers.RandomContrast(0.2),
        ]
    )
    inputs = keras.Input(shape=(size, size, 3))
    x = base(preprocess(augmentation(inputs)), training=False)
    x = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, keras.layers.Dense(len(train.class_names), activation="softmax")(x))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    epoch_seconds: list[float] = []
    per_epoch: list[dict[str, float]] = []
    last: dict[str, np.ndarray] = {}
    if test:
        test_images = keras.utils.image_dataset_from_directory(folders / "test", shuffle=False, **options)
        y_test = np.concatenate([labels for _, labels in test_images])

    def on_epoch_end(epoch, logs):
        epoch_seconds.append(time.perf_counter() - epoch_seconds.pop())
        if test:
            elapsed = time.time() - launched - sum(row["test_seconds"] for row in per_epoch)
            before = time.perf_counter()
            last["probabilities"] = model.predict(test_images, verbose=0)
            accuracy = float(np.mean(last["probabilities"].argmax(axis=1) == y_test))
            per_epoch.append(
                {
                    "epoch": epoch + 1,
                    "elapsed": elapsed,
                    "val_accuracy": logs["val_accuracy"],
                    "test_accuracy": accuracy,
                    "test_seconds": time.perf_counter() - before,
                }
            )

    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epoch_seconds.append(time.perf_counter()), on_epoch_end=on_epoch_end
    )
    history = model.fit(train, validation_data=val, epochs=epochs, callbacks=[timer], verbose=2)
    result = {
        "fit": time.perf_counter() - started - sum(row["test_seconds"] for row in per_epoch),
        "epoch": statistics.median(epoch_seconds[1:] or epoch_seconds),
        "val_accuracy": history.history["val_accuracy"][-1],
        "epochs": len(epoch_seconds),
    }
    if test:
        report = classification_report(y_test, last["probabilities"], train.class_names, top_k=1)
        result |= {
            "per_epoch": per_epoch,
            "test": {k: report[k] for k in ("accuracy", "ece")} | {"macro_f1": report["macro"]["f1"]},
        }
    return result


def run(
    workdir: Path,
    application: str,
    weights: str | None,
    size: int,
    epochs: int,
    batch_size: int,
    seed: int,
    test: bool = False,
) -> dict:
    """``recipe`` in a fresh Python on our split of ``workdir``; ``total``: its whole wall time,
    without the test predictions' (``fit``: from dataset creation to the end of ``fit``)."""
    folders = split_folders(workdir, ("train", "val", "test") if test else ("train", "val"))
    launched = time.time()
    settings = [str(folders), application, weights, size, epochs, batch_size, seed, launched, test]
    result = subprocess.run(
        [sys.executable, __file__, json.dumps(settings)],
        env=stage_env(workdir),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        sys.exit(f"the recipe failed ({result.returncode}):\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    test_seconds = sum(row["test_seconds"] for row in figures.get("per_epoch", []))
    return {**figures, "total": time.time() - launched - test_seconds}


if __name__ == "__main__":
    folders, *settings = json.loads(sys.argv[1])
    print(json.dumps(recipe(Path(folders), *settings)))
