"""Predict: the top labels of image files, from the pipeline's model or any logged MLflow model.

    python -m pipeline.tools.predict PATH... [--model MODEL] [--labels FILE] [--top-k K] [--json]
    python -m pipeline.tools.predict PATH... --imagenet [WEIGHTS]

PATH is an image file or a folder (searched recursively for image files). MODEL is
``data/model/model.keras`` by default, another ``.keras`` file, or an MLflow model URI of the
Keras flavor (``runs:/<run_id>/model``, ``models:/<name>-keras@champion``, ``models:/<name>-keras/<version>``):
raw uint8 images of any size in, class probabilities out. Labels come from ``labels.json`` beside
a model file, or from the MLflow model's metadata, unless ``--labels`` names a file. Each file
becomes the model's input as on every other path (pipeline/data/images.py ``model_input``), so the
answers are the model server's and those evaluate scored.

Output, one line per image: ``path<TAB>label 0.912<TAB>label 0.050...``; with ``--json``, one JSON
object per line: ``{"path": ..., "predictions": [{"label": ..., "probability": ...}, ...]}``.
A file that cannot be read is skipped with one line on stderr naming it and why; the exit status
is then 1. Usage errors (no model, bad labels) exit with 2.

``--imagenet``: what the pretrained backbone itself sees, before any training: the top ImageNet
classes of ``model.backbone`` (and ``model.alpha``) with its original 1,000-class classifier, a
quick check of a dataset and a hint of which backbone knows its domain. WEIGHTS is ``imagenet``
(the default: Keras downloads them) or a weights file saved with the classifier. Class names come
from Keras's ImageNet class index (downloaded once); without it, the class numbers are shown.
"""

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np

from pipeline.cli import UserError, error_summary, run_stage
from pipeline.config import load_config
from pipeline.data.images import IMAGE_SUFFIXES, model_input
from pipeline.files import read_json
from pipeline.model import networks
from pipeline.paths import MODEL_FILE, MODEL_LABELS
from pipeline.report import tracking
from pipeline.serving import DEFAULT_TOP_K, top_labels

# Keras's own ImageNet class index (what keras.applications.imagenet_utils.decode_predictions reads).
IMAGENET_CLASS_INDEX = "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"
IMAGENET_CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.predict", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    parser.add_argument(
        "--model", default=str(MODEL_FILE), help=f"a .keras file or an MLflow model URI (default: {MODEL_FILE})"
    )
    parser.add_argument("--labels", type=Path, help="JSON list of class names (default: beside the model)")
    parser.add_argument(
        "--top-k",
        type=positive_int,
        default=DEFAULT_TOP_K,
        help=f"labels per image, at most the number of classes (default: {DEFAULT_TOP_K})",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--imagenet",
        nargs="?",
        const="imagenet",
        metavar="WEIGHTS",
        help="the backbone's own ImageNet classes instead (WEIGHTS: imagenet or a with-top file)",
    )
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return int(text)


def load_model(source: str, labels_path: Path | None) -> tuple[keras.Model, list[str]]:
    if Path(source).is_file():
        model, labels = (
            load_keras_file(Path(source)),
            read_labels(labels_path or Path(source).with_name(MODEL_LABELS.name)),
        )
    elif ":/" in source or Path(source).is_dir():  # an MLflow URI, or a local MLflow model folder
        model, labels = load_mlflow_model(source, labels_path)
    else:
        raise UserError(
            f"no model at {source}: run the pipeline first (dvc repro) "
            "or pass --model <file.keras | runs:/<run_id>/model>"
        )
    n_classes = model.output_shape[-1]
    if len(labels) != n_classes:
        raise UserError(
            f"the model has {n_classes} classes but the labels list {len(labels)}: "
            "pass the labels.json made with this model (--labels)"
        )
    return model, labels


def load_keras_file(path: Path) -> keras.Model:
    try:
        return networks.load(path)
    except Exception as err:  # Keras raises ValueError, OSError, zipfile errors... for files it cannot load
        raise UserError(f"cannot load a Keras model from {path} ({error_summary(err)})") from None


def load_mlflow_model(uri: str, labels_path: Path | None) -> tuple[keras.Model, list[str]]:
    try:
        info = tracking.logged_model_info(uri)
    except Exception as err:  # MLflow raises MlflowException, OSError, ... for unknown URIs
        raise UserError(f"--model {uri}: {error_summary(err)}") from None
    if "keras" not in info.flavors:
        raise UserError(
            f"--model {uri} is not a Keras model (flavors: {', '.join(info.flavors)}); "
            f"use the run's Keras model, runs:/{info.run_id}/model"
        )
    model = tracking.load_keras_model(uri)
    if labels_path:
        return model, read_labels(labels_path)
    labels = (info.metadata or {}).get("labels")  # where the train stage logs them
    if labels is None:
        raise UserError(f"--model {uri} has no class names in its metadata (labels): pass --labels FILE")
    return model, class_names(labels, f"the labels in the metadata of {uri}")


def read_labels(path: Path) -> list[str]:
    try:
        labels = read_json(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read labels from {path} ({error_summary(err)}): pass --labels FILE") from None
    return class_names(labels, str(path))


def class_names(labels, where: str) -> list[str]:
    if not (isinstance(labels, list) and labels and all(isinstance(label, str) for label in labels)):
        raise UserError(f"{where} must hold a JSON list of class names")
    return labels


def image_files(paths: list[Path]) -> Iterator[tuple[Path, str | None]]:
    """(file, None) for each file named and each image file in each folder named (sorted), or
    (path, why) when a path has nothing to predict."""
    for path in paths:
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            yield from ((p, None) for p in found) if found else [(path, "no image files in this folder")]
        elif not path.exists():
            yield path, "no such file or folder"
        else:  # a FIFO, socket or device would block or never end: only regular files are read
            yield path, None if path.is_file() else "not a regular file (a FIFO, socket or device)"


def predictions(model: keras.Model, paths: list[Path]) -> Iterator[tuple[Path, np.ndarray | str]]:
    """(file, class probabilities) for each image, or (path, why) when it cannot be predicted."""
    size = networks.input_size(model)
    for path, problem in image_files(paths):
        if problem:
            yield path, problem
            continue
        try:
            pixels = model_input(path, size)
        except Exception as err:  # Pillow raises many types for unreadable files; each is reported
            yield path, f"cannot read image ({error_summary(err)})"
            continue
        yield path, model.predict_on_batch(pixels[np.newaxis])[0]


def format_line(path: Path, ranked: list[tuple[str, float]], as_json: bool) -> str:
    if as_json:
        return json.dumps(
            {"path": str(path), "predictions": [{"label": label, "probability": round(p, 6)} for label, p in ranked]}
        )
    return "\t".join([str(path), *(f"{label} {p:.3f}" for label, p in ranked)])


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names in index order (Keras's class index, downloaded once and
    cached), or ``class <n>`` when it cannot be had (offline)."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Keras announces its download on stdout, where answers go
            index = read_json(
                Path(
                    keras.utils.get_file(
                        "imagenet_class_index.json",
                        IMAGENET_CLASS_INDEX,
                        cache_subdir="models",
                        file_hash=IMAGENET_CLASS_INDEX_MD5,
                    )
                )
            )
        return [index[str(i)][1] for i in range(1000)]
    except Exception as err:  # no network: urllib's and Keras's errors alike
        print(f"note: no ImageNet class names ({error_summary(err)[:120]}): showing class numbers", file=sys.stderr)
        return [f"class {i}" for i in range(1000)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.imagenet:
        model, labels = networks.imagenet_classifier(load_config().model, args.imagenet), imagenet_labels()
    else:
        model, labels = load_model(args.model, args.labels)
    if args.top_k > len(labels):
        print(
            f"note: --top-k {args.top_k} is more than the model's {len(labels)} classes; showing all of them",
            file=sys.stderr,
        )
    failed = 0
    for path, outcome in predictions(model, args.paths):
        if isinstance(outcome, str):
            print(f"skipped {path}: {outcome}", file=sys.stderr, flush=True)
            failed += 1
        else:
            print(format_line(path, top_labels(outcome, labels, args.top_k), args.json), flush=True)
    if failed:
        sys.exit(1)


def console() -> None:
    """The `transfer-predict` command (pyproject.toml's [project.scripts])."""
    run_stage(main)


if __name__ == "__main__":
    run_stage(main)
