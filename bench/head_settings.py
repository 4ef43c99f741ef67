"""Head settings on real features: what each setting of a Keras-trained head is worth.

Trains the head (``networks.head``) with Keras the way the train stage's head phase did before issue
23 and still trains an MLP head (``model.head.dense_units`` > 0), at one L2 strength, none (its loss,
optimizer, learning-rate schedule, early stopping, class weights and temperature scaling:
``train.compile_for``, ``train.stopping_and_schedule``, ``train.class_weights``,
``metrics.fitted_temperature`` and ``networks.fold_temperature``) on the features a project's
features stage cached, once per seed and setting, and scores it on the test split's features:
accuracy, ECE (``pipeline.report.metrics``, as the evaluate stage) and log loss, as means over the
seeds. Each setting changes one or more params from the project's ``params.yaml``. The linear head
the train stage now solves is measured by ``head_quality.py``.

    python bench/head_settings.py --workdir /tmp/quality-xyz   (a project whose features stage ran, e.g. bench/quality.py's)
"""

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn.metrics import log_loss

from common import section
from pipeline.config import Config, load_config, override_params
from pipeline.model import networks
from pipeline.report.metrics import expected_calibration_error, fitted_temperature
from pipeline.stages import train

SEEDS = [42, 1, 2, 3, 4, 5]
SETTINGS: dict[str, dict[str, Any]] = {  # name: params changed from the project's; the first is the project's own
    "params.yaml as it is": {},
    "temperature_scaling false (the defaults before issue 13)": {"train.temperature_scaling": False},
    "label_smoothing 0": {"train.label_smoothing": 0.0},
    "label_smoothing 0, temperature_scaling false": {"train.label_smoothing": 0.0, "train.temperature_scaling": False},
    "learning_rate 0.0003": {"train.learning_rate": 0.0003},
    "dropout 0.5": {"model.head.dropout": 0.5},
    "epochs 30 (early stopping still on)": {"train.epochs": 30},
}


def config_with(workdir: Path, overrides: dict) -> Config:
    """The project's config with ``overrides`` (dotted keys), validated like a params.yaml."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "params.yaml"
        shutil.copy(workdir / "params.yaml", path)
        override_params(path, overrides)
        return load_config(path)


def one_run(cfg: Config, features: dict, labels: dict, seed: int) -> dict:
    keras.utils.set_random_seed(seed)
    n_classes = int(labels["train"].max()) + 1
    head = networks.head(networks.standardization(features["train"]), n_classes, cfg.model.head)
    phase = train.Phase(
        "head", "", 0, cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate, "train.learning_rate"
    )
    train.compile_for(head, phase, -(-len(features["train"]) // phase.batch_size), cfg)
    one_hot = {split: keras.utils.to_categorical(y, n_classes) for split, y in labels.items()}
    history = head.fit(
        features["train"],
        one_hot["train"],
        validation_data=(features["val"], one_hot["val"]),
        epochs=phase.epochs,
        batch_size=phase.batch_size,
        verbose=0,
        class_weight=train.class_weights(labels["train"], n_classes, cfg.train.class_weight),
        callbacks=train.stopping_and_schedule(cfg),
    )
    temperature = 1.0
    if cfg.train.temperature_scaling:
        temperature = fitted_temperature(labels["val"], head.predict(features["val"], verbose=0))
        networks.fold_temperature(head, temperature)
    test = head.predict(features["test"], verbose=0)
    return {
        "accuracy": float(np.mean(test.argmax(axis=1) == labels["test"])),
        "ece": expected_calibration_error(labels["test"], test),
        "log_loss": log_loss(labels["test"], test, labels=range(n_classes)),
        "temperature": temperature,
        "epochs": len(history.history["loss"]),
    }


def run(workdir: Path, seeds: list[int]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Every setting of SETTINGS over ``seeds``: the table's header and rows."""
    features_dir = workdir / "data/features"
    features = {split: np.load(features_dir / f"{split}.npy") for split in ("train", "val", "test")}
    labels = {split: np.load(features_dir / f"{split}_labels.npy") for split in features}
    header = ("setting", "test accuracy (mean, min..max)", "ECE", "log loss", "epochs run", "temperature")
    rows: list[tuple[str, ...]] = []
    for name, overrides in SETTINGS.items():
        cfg = config_with(workdir, overrides)
        runs = [one_run(cfg, features, labels, seed) for seed in seeds]
        mean = {key: statistics.mean(r[key] for r in runs) for key in runs[0]}
        accuracies = [r["accuracy"] for r in runs]
        rows.append(
            (
                f"{name} {json.dumps(overrides) if overrides else ''}".strip(),
                f"{mean['accuracy']:.3f} ({min(accuracies):.3f}..{max(accuracies):.3f})",
                f"{mean['ece']:.3f}",
                f"{mean['log_loss']:.3f}",
                f"{mean['epochs']:.1f}",
                f"{mean['temperature']:.2f}",
            )
        )
        print(rows[-1], flush=True)
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a project whose features stage ran")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=SEEDS)
    args = parser.parse_args()
    header, rows = run(args.workdir, args.seeds)
    print(
        section(
            f"Head settings on the features of {args.workdir}",
            rows,
            f"python bench/head_settings.py --workdir {args.workdir} --seeds {','.join(map(str, args.seeds))}",
            header,
        )
    )


if __name__ == "__main__":
    main()
