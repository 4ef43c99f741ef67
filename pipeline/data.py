"""Reading the files stages hand to each other: manifests, labels, and image batches for tf.data."""

import csv
from pathlib import Path

from pipeline.files import atomic_file, read_json

# Where each stage writes; the next stage reads from there (see dvc.yaml).
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
AUGMENTED_DIR = Path("data/augmented")
FEATURES_DIR = Path("data/features")
MODEL_DIR = Path("data/model")
# The data.labels table as the download stage copies it: paths relative to RAW_DIR; hidden, so never an image.
LABELS_TABLE = RAW_DIR / ".labels.csv"
LABELS_COLUMNS = ("path", "label", "split")  # split is optional
SPLITS = ("train", "val", "test")
# Names (lower case) that mean a split, as top-level folders of a source or in a labels table's split column.
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
JPEG_QUALITY = 95  # for the images stages write: high enough that re-encoding costs no accuracy


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_manifest(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_file(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def test_images() -> list[dict[str, str]]:
    """The test split's rows of the augmented manifest: copy 0 only, resized, never randomly changed."""
    return [r for r in read_manifest(AUGMENTED_DIR / "manifest.csv") if r["split"] == "test" and r["copy"] == "0"]


def read_labels(path: Path = PREPARED_DIR / "labels.json") -> list[str]:
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
