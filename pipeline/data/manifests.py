"""Reading the files stages hand to each other: manifests, labels, and image batches for tf.data."""

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from pipeline.cli import UserError
from pipeline.files import atomic_file, read_json, sha256_of
from pipeline.paths import MODEL_FILE, PREPARED_LABELS, PREPARED_MANIFEST, RAW_DIR, TEST_PROBABILITIES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Row = TypeVar("Row", bound="DataclassInstance")


@dataclass(frozen=True)
class PreparedImage:
    """A row of PREPARED_MANIFEST: one usable image, after dedupe and split."""

    path: str  # under PREPARED_DIR: images/<label folder>/<start of sha256>.jpg
    label: str
    split: str  # one of SPLITS
    sha256: str  # of the normalized image's bytes
    width: int
    height: int
    source: str  # its file under RAW_DIR, as quarantine.csv and ignored.csv name files


@dataclass(frozen=True)
class AugmentedImage:
    """A row of AUGMENTED_MANIFEST: one image as the backbone sees it."""

    path: str  # under AUGMENTED_DIR: <split>/<label>/<stem>_<copy>.jpg
    label: str
    split: str
    copy: int  # 0 = the resized original; 1.. = offline variants (train only)
    source: str  # the PreparedImage.path it was made from


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Any CSV a stage writes, as dicts (reports: quarantine.csv, ignored.csv, duplicates.csv, ...)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_rows(path: Path, row_type: type[Row]) -> list[Row]:
    """A manifest of typed rows (PreparedImage, AugmentedImage), each value converted to its field's type."""
    types = {f.name: cast(Callable[[str], Any], f.type) for f in fields(row_type)}  # str, int: no string annotations
    return [row_type(**{k: types[k](v) for k, v in r.items()}) for r in read_manifest(path)]


def write_manifest(path: Path, header: list[str], rows: Iterable[Sequence[Any]]) -> None:
    with atomic_file(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def write_rows(path: Path, row_type: type[Row], rows: list[Row]) -> None:
    """Typed rows as a manifest, the fields of ``row_type`` as its header."""
    write_manifest(path, [f.name for f in fields(row_type)], [astuple(r) for r in rows])


def split_files(split: str) -> tuple[list[PreparedImage], list[str]]:
    """The rows of ``split`` in the prepared manifest, and each one's original file (under RAW_DIR):
    what a user would send the model. Evaluate scores the test split's, export checks its formats on them."""
    rows = [r for r in read_rows(PREPARED_MANIFEST, PreparedImage) if r.split == split]
    return rows, [str(RAW_DIR / r.source) for r in rows]


def write_test_probabilities(probabilities: np.ndarray, paths: list[str]) -> None:
    """TEST_PROBABILITIES: ``probabilities`` (a row per test file of ``paths``, a column per label)
    of the model in MODEL_FILE, which it names by its sha256."""
    with atomic_file(TEST_PROBABILITIES, "wb") as fh:
        np.savez(fh, probabilities=probabilities, paths=np.array(paths), model_sha256=sha256_of(MODEL_FILE))


def read_test_probabilities(paths: list[str]) -> np.ndarray:
    """TEST_PROBABILITIES' rows, checked to be of MODEL_FILE's model on exactly the files ``paths``."""
    if not TEST_PROBABILITIES.is_file():
        raise UserError(f"{TEST_PROBABILITIES} is missing: run the evaluate stage first (dvc repro)")
    with np.load(TEST_PROBABILITIES) as saved:
        if str(saved["model_sha256"]) != sha256_of(MODEL_FILE) or saved["paths"].tolist() != paths:
            raise UserError(
                f"{TEST_PROBABILITIES} is of another model or other test images than {MODEL_FILE}'s: "
                "run the evaluate stage first (dvc repro)"
            )
        return saved["probabilities"]


def read_labels(path: Path = PREPARED_LABELS) -> list[str]:
    return read_json(path)


def image_batches(paths: list[str], batch_size: int):
    """Batches of decoded uint8 images, decoded in parallel and prefetched so the model never waits."""
    import tensorflow as tf

    def decode(path):
        return tf.io.decode_jpeg(tf.io.read_file(path), channels=3)

    return (
        tf.data.Dataset.from_tensor_slices(paths)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
