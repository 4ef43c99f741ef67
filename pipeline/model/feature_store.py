"""The features stage's output, ``data/features/``: its one writer and its one reader.

Per split (``train``, ``val``, ``test``), rows in the order of that split's rows of
``data/augmented/manifest.csv``:

- ``<split>.npy``: pooled backbone features, float32, shape (rows, dim);
- ``<split>_labels.npy``: class indices into ``labels.json``, int32;
- ``<split>_activations.npy`` (train and val, only when fine-tuning can use them: ``Config.activation_cut``):
  the frozen prefix's output at the cut, 16-bit (:func:`activation_storage`).

And ``served_test.npz``: the test split's *original files* (``data/raw``), made the model's input
by the model server's own code (``serving.file_batches``) and run through the backbone in float32
as the exported model runs it: their pooled features (``features``, one row per file of ``paths``,
in the prepared manifest's order) and, for the images Grad-CAM shows (``examples``: indices into
``paths``, ``gradcam.examples``), the backbone's last feature maps (``maps``). Evaluate scores a
model whose backbone was not fine-tuned on these rows with its head alone.

Beside them: ``labels.json`` (the class names), ``meta.json`` (:class:`Meta`) and
``backbone.weights.h5``, the exact backbone weights that made the rows (with ``model.weights: none``
a rebuilt backbone would have other random weights). Arrays are ``.npy`` files, written a batch at a
time and read memory-mapped, so a store larger than RAM streams from disk.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cli import UserError
from pipeline.data.manifests import AugmentedImage, read_rows
from pipeline.files import read_json, write_json
from pipeline.paths import AUGMENTED_DIR, AUGMENTED_MANIFEST, FEATURES_DIR

ACTIVATION_SPLITS = ("train", "val")  # the splits fine-tuning reads; test images go through the exported model
BACKBONE_WEIGHTS = "backbone.weights.h5"
LABELS = "labels.json"
META = "meta.json"
SERVED_TEST = "served_test.npz"
FILE_DTYPE = {"float16": "float16", "bfloat16": "uint16"}  # activations' storage type -> the .npy's dtype


@dataclass(frozen=True)
class Meta:
    """What made the store (``meta.json``)."""

    backbone: str
    weights: str
    image_size: int
    precision: str  # the Keras dtype policy the backbone computed in
    dim: int  # features per row
    activation_cut: str | None  # the block whose output is stored, or None
    activation_dtype: str | None  # bfloat16 | float16, when activations are stored
    images: int
    seconds: float  # extraction time


def activation_storage(policy: str) -> str:
    """The 16-bit type activations are stored in: float16 when the backbone computes in float16,
    else bfloat16, which is lossless for bfloat16 compute and keeps float32's range. (float16 would
    not do: a random-init backbone's activations at mixed8 are around 6e-4, and 6 % of them fall
    below float16's normal range, losing precision or flushing to zero.)"""
    return "float16" if policy == "mixed_float16" else "bfloat16"


def as_stored(values: np.ndarray, storage: str) -> np.ndarray:
    """numpy has no bfloat16 of its own: its 16-bit patterns go to the file as uint16."""
    if storage == "float16":
        return values.astype("float16")
    import keras

    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(values, "bfloat16"))).view("uint16")


# ---- writing (the features stage) -------------------------------------------------------------


def new_features(folder: Path, split: str, count: int, dim: int) -> np.memmap:
    return np.lib.format.open_memmap(folder / f"{split}.npy", mode="w+", dtype="float32", shape=(count, dim))


def new_activations(folder: Path, split: str, shape: tuple[int, ...], storage: str) -> np.memmap:
    return np.lib.format.open_memmap(
        folder / f"{split}_activations.npy", mode="w+", dtype=FILE_DTYPE[storage], shape=shape
    )


def write_labels(folder: Path, split: str, labels: list[int]) -> None:
    np.save(folder / f"{split}_labels.npy", np.array(labels, dtype="int32"))


def write_served_test(
    folder: Path, paths: list[str], features: np.ndarray, examples: np.ndarray, maps: np.ndarray
) -> None:
    np.savez(folder / SERVED_TEST, paths=np.array(paths), features=features, examples=examples, maps=maps)


def write_meta(folder: Path, meta: Meta) -> None:
    write_json(folder / META, dataclasses.asdict(meta))


# ---- reading (train, label_issues, benches) ---------------------------------------------------


def read_meta(folder: Path = FEATURES_DIR) -> Meta:
    """The store's meta; a missing store stops with one line saying what to run."""
    if not (folder / META).is_file():
        raise UserError(f"{folder} is missing: run the features stage first (dvc repro)")
    return Meta(**read_json(folder / META))


def labels(split: str, folder: Path = FEATURES_DIR) -> np.ndarray:
    return np.load(folder / f"{split}_labels.npy")


def features(split: str, folder: Path = FEATURES_DIR) -> np.ndarray:
    """The split's features, memory-mapped: the OS keeps in RAM what fits and streams the rest."""
    return np.load(folder / f"{split}.npy", mmap_mode="r")


def activations(split: str, cut: str, folder: Path = FEATURES_DIR) -> tuple[np.ndarray, bool]:
    """The split's stored activations at ``cut``, memory-mapped, and whether they are bfloat16 bit
    patterns (uint16 in the file) rather than float16."""
    meta = read_meta(folder)
    if meta.activation_cut != cut:
        raise UserError(f"{folder} holds no activations at {cut}: run dvc repro (the features stage)")
    return np.load(folder / f"{split}_activations.npy", mmap_mode="r"), meta.activation_dtype == "bfloat16"


@dataclass(frozen=True)
class ServedTest:
    """``served_test.npz``'s rows (see the module docstring)."""

    features: np.ndarray
    examples: np.ndarray
    maps: np.ndarray


def served_test(paths: list[str], folder: Path = FEATURES_DIR) -> ServedTest | None:
    """The backbone's outputs on the test files ``paths`` as served, or None when the store holds
    none for exactly these files (a store from before it had them, or other test files)."""
    if not (folder / SERVED_TEST).is_file():
        return None
    with np.load(folder / SERVED_TEST) as saved:
        if saved["paths"].tolist() != paths:
            return None
        return ServedTest(saved["features"], saved["examples"], saved["maps"])


def manifest_rows(split: str, folder: Path = FEATURES_DIR) -> list[AugmentedImage]:
    """The augmented manifest's rows of ``split``, one per row of the store, checked to match it."""
    rows = [r for r in read_rows(AUGMENTED_MANIFEST, AugmentedImage) if r.split == split]
    count = len(labels(split, folder))
    if len(rows) != count:
        raise UserError(
            f"{folder} does not match {AUGMENTED_DIR} ({count} vs {len(rows)} {split} images): run dvc repro"
        )
    return rows
