"""The one typed, validated view of ``params.yaml``.

Every stage calls :func:`load_config` first, so a wrong key or value fails before any work starts,
with one line naming the key and what is allowed. Each param's type, range and meaning (its
``Field(description=...)``) and the derived values live here; docs/params.md is generated from them
(``python -m pipeline.tools.params_doc``). Values live in params.yaml alone, with short comments
(tests/test_params_doc.py keeps the three in step), so no field has a default here.
"""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from pipeline.cli import UserError, redact_url
from pipeline.model.backbones import BACKBONES, Backbone
from pipeline.paths import SPLIT_NAMES

# Largest image decoded, read from the file's header before decoding: 50 Mpx is 150 MB of pixels.
# The model server refuses larger photos (they are not scaled down) and prepare quarantines them
# (prepare.max_pixels), so every test image is one the server answers. Here, not in
# pipeline/data/images.py, so that the download stage, which reads this module, does not import that.
MAX_MEGAPIXELS = 50

PARAMS_FILE = Path("params.yaml")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")  # what data.url may end in besides a folder
MAX_QUOTED = 80  # characters of a wrong value quoted in an error message
SEED_LIMIT = 2**32  # numpy, TensorFlow and albumentations all take seeds below this
SHORT_HASH = 6  # hex digits of the source's hash in default MLflow names, and of the params' in run names

Fraction = Annotated[float, Field(gt=0, lt=1)]
AreaFraction = Annotated[float, Field(gt=0, le=1)]
if TYPE_CHECKING:  # the registry's names, known only at run time
    BackboneName = str
else:
    BackboneName = Literal[tuple(BACKBONES)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(Section):
    """Where the images come from and how the download stage treats them ([Data](data.md))."""

    url: str = Field(
        min_length=1,
        description=(
            "Where the images come from: an http(s):// or file:// URL of an archive, a local archive "
            f"({', '.join(ARCHIVE_SUFFIXES)}: recognised by content), or a local folder (copied into data/raw). "
            "Inside: one folder per class, or split folders train/, val/ (valid/, validation/), test/ of class "
            "folders, or any files `labels` names ([layouts](data.md#layouts))."
        ),
    )
    sha256: str | None = Field(
        pattern=r"^[0-9a-f]{64}$",
        description=(
            "Expected sha256 of the archive; null = not checked (the computed hash goes to "
            "reports/download.json, which dvc.lock pins)."
        ),
    )
    max_per_class: Annotated[int, Field(gt=0)] | None = Field(
        description=("null = every image; an integer keeps at most that many images per class (quick runs).")
    )
    max_files: Annotated[int, Field(gt=0)] = Field(
        description=("Refuse archives holding more files than this (archive bombs).")
    )
    max_bytes: Annotated[int, Field(gt=0)] = Field(
        description=(
            "Refuse downloads of, and archives unpacking to, more bytes than this (zip and tar bombs), counted as "
            "they arrive and as they are written; a partial download over it is deleted."
        )
    )
    max_seconds: Annotated[float, Field(gt=0)] = Field(
        description=(
            "Give a download up after this many seconds, all tries together (a trickling server); the partial "
            "file is kept, so a rerun resumes it."
        )
    )
    labels: str | None = Field(
        min_length=1,
        description=(
            "null = labels from folders; or the path of a CSV table `path,label[,split]` (paths relative to the "
            "source): then only the files it lists are used ([labels table](data.md#labels-table))."
        ),
    )
    class_depth: Annotated[int, Field(ge=1, le=16)] = Field(
        description=("Folder levels that make the label: 1 = the top folder (`dogs`), 2 = two levels (`dogs/husky`).")
    )


class SplitParams(Section):
    """Fractions of each class held out where the source gives no split; the rest trains. val + test < 1."""

    val: Fraction = Field(description="Share of each class held out for validation (early stopping, temperature).")
    test: Fraction = Field(description="Share of each class held out for the test metrics.")

    @model_validator(mode="after")
    def _leave_room_for_train(self) -> "SplitParams":
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be below 1 so that some images train (got {self.val + self.test:g})")
        return self


class PrepareParams(Section):
    """Decoding, quarantine, duplicates and the split ([Data](data.md))."""

    split: SplitParams
    max_side: Annotated[int, Field(ge=32)] = Field(
        description=(
            "Prepared images are re-encoded as JPEG with their shorter side at most this many pixels, so the "
            "model's central square keeps that resolution; keep it at least model.image_size."
        )
    )
    min_side: Annotated[int, Field(ge=1)] = Field(
        description=("Images whose shorter side is below this many pixels are quarantined.")
    )
    max_aspect_ratio: Annotated[float, Field(ge=1)] = Field(
        description=(
            "Images whose longer side is more than this many times the shorter are quarantined: the model sees "
            "a photo's central square (pipeline/data/images.py model_input); the model server crops them all the same."
        )
    )
    max_pixels: Annotated[int, Field(gt=0, le=MAX_MEGAPIXELS * 1_000_000)] = Field(
        description=(
            "Images of more pixels than this (width x height, read from the file's header: decompression bombs are "
            "never decoded) are quarantined; at most what the model server decodes (50 megapixels), so every test "
            "image can be served."
        )
    )
    near_duplicate_distance: Annotated[int, Field(ge=0, le=64)] | None = Field(
        description=(
            "Images whose perceptual hashes (64 bits) differ in at most this many bits and whose 32x32 grey "
            "thumbnails correlate >= 0.95 are near-duplicates and go to the same split (0 = identical hashes only; "
            "null = none, near-copies may straddle splits)."
        )
    )


class HeadParams(Section):
    """The new classifier on the pooled backbone features (pipeline.model.networks.head); changing it
    reuses the cached features."""

    dense_units: Annotated[int, Field(ge=0)] = Field(
        description=("0 = softmax right on the features; N = one extra ReLU layer of N units first.")
    )
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        description=("Dropout rate before the softmax layer, in Keras training (an MLP head, fine-tuning).")
    )


# The largest model.image_size: over 3 times every backbone's native size (224-300 px), which is
# what its ImageNet features were learned at; memory and time per image grow with the square of the
# side (11 times 299 px's at 1024), so larger sizes cost far more than they can give.
MAX_IMAGE_SIZE = 1024


class ModelParams(Section):
    """The pretrained backbone and the new head ([Training](training.md))."""

    backbone: BackboneName = Field(description="The pretrained network, frozen at first ([Backbones](#backbones)).")
    weights: str = Field(
        min_length=1,
        description=(
            "`imagenet` (downloaded once by Keras, hash-checked, cached), `none` (random init: only for testing "
            "the plumbing), or the path of a Keras weights file of the backbone without its top "
            "([your own weights file](training.md#weights))."
        ),
    )
    image_size: Annotated[int, Field(gt=0)] | None = Field(
        description=(
            "Input side in pixels; null = the backbone's native size. At least the backbone's minimum, at most "
            f"{MAX_IMAGE_SIZE} ([Backbones](#backbones))."
        )
    )
    alpha: float | None = Field(
        description=(
            "Width multiplier: one of the backbone's widths ([Backbones](#backbones)); null = its default. "
            "Backbones without widths take null only."
        )
    )
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = Field(
        description=(
            "Compute dtype of the backbone (features and fine-tuning); the weights, the head and the exported "
            "model stay float32. `auto`: mixed_float16 on a GPU; on CPUs with bfloat16 units (Intel AMX, "
            "AVX512-BF16) mixed_bfloat16 for the backbones it speeds up (the bfloat16 column of "
            "[Backbones](#backbones)); float32 otherwise."
        )
    )
    head: HeadParams

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, value: str) -> str:
        if value not in ("imagenet", "none") and not Path(value).is_file():
            raise ValueError(f"no weights file at '{value}'; use imagenet, none, or the path of a weights file")
        return value

    @model_validator(mode="after")
    def _size_fits_backbone(self) -> "ModelParams":
        minimum = BACKBONES[self.backbone].min_size
        if self.image_size is not None and self.image_size < minimum:
            raise ValueError(f"image_size {self.image_size} is below {self.backbone}'s minimum of {minimum}")
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size {self.image_size} is above the largest size, {MAX_IMAGE_SIZE} (ImageNet "
                f"backbones are trained at 224-300 px; memory grows with the square of the side): lower it"
            )
        return self

    @model_validator(mode="after")
    def _alpha_fits_backbone(self) -> "ModelParams":
        alphas = BACKBONES[self.backbone].alphas
        if self.alpha is not None and not alphas:
            raise ValueError(f"alpha {self.alpha}: {self.backbone} has no width multiplier; set alpha to null")
        if self.alpha is not None and self.alpha not in alphas:
            allowed = ", ".join(str(a) for a in sorted(alphas))
            raise ValueError(
                f"alpha {self.alpha} is not one of {self.backbone}'s widths ({allowed}; null = {alphas[0]})"
            )
        return self

    @property
    def spec(self) -> Backbone:
        return BACKBONES[self.backbone]

    @property
    def width(self) -> float | None:
        """``alpha``, or the backbone's default width when null; None for backbones without one."""
        return self.alpha if self.alpha is not None else next(iter(self.spec.alphas), None)

    @property
    def architecture(self) -> str:
        """The backbone as built, for messages: ``mobilenet alpha 0.25``, ``inception_v3``."""
        return self.backbone if self.width is None else f"{self.backbone} alpha {self.width}"

    @property
    def input_size(self) -> int:
        """The size images are fed at: ``image_size``, or the backbone's native size when null."""
        return self.image_size or self.spec.native_size


Probability = Annotated[float, Field(ge=0, le=1)]
AspectRatio = Annotated[float, Field(gt=0, le=10)]


class OnlineOnlyParams(Section):
    """Core Keras 3 layers with no offline counterpart (the ones keras-cv had): RandAugment, MixUp, CutMix.
    Off by default; only with mode online or both, where fine-tuning on the images runs them after the
    steps above."""

    rand_augment_ops: Annotated[int, Field(ge=0, le=11)] = Field(
        description=(  # RandAugment has 11 operations
            "keras.layers.RandAugment: this many of its 11 operations (rotate, shear, solarize, equalize...), "
            "drawn per batch; 0 = off."
        )
    )
    rand_augment_factor: Annotated[float, Field(gt=0, le=1)] = Field(
        description=("Their strength: each draws its magnitude in [0, factor], in one direction only (Keras 3.15).")
    )
    mix: Literal["none", "mixup", "cutmix"] = Field(
        description=(
            "`mixup` blends two images, `cutmix` pastes a box of one into another, their labels mixed alike; "
            "`none` = off."
        )
    )
    mix_alpha: Annotated[float, Field(gt=0)] = Field(
        description=(
            "The share of the first image ~ Beta(alpha, alpha); MixUp's paper used 0.2 on ImageNet, CutMix's 1.0."
        )
    )

    @property
    def enabled(self) -> list[str]:
        """The options that are on, as ``name=value``, for messages."""
        return [
            f"{name}={value}"
            for name, value in (("rand_augment_ops", self.rand_augment_ops), ("mix", self.mix))
            if value not in (0, "none")
        ]


class AugmentParams(Section):
    """One policy for the offline augment stage and the online training layers (pipeline/data/augmentation.py),
    its steps in the order below; a step whose value is 0 is off. Validation and test images are never
    augmented ([Augmentation](augmentation.md))."""

    mode: Literal["offline", "online", "both"] = Field(
        description=(
            "`offline`: the augment stage writes `copies` variants per training image; `online`: it writes only "
            "the resized originals and fine-tuning augments each batch; `both`: variants on disk and online "
            "augmentation on top."
        )
    )
    copies: Annotated[int, Field(ge=0, le=100)] = Field(
        description=("Random variants written per training image besides its resized original (unused when online).")
    )
    crop_scale: tuple[AreaFraction, AreaFraction] = Field(
        strict=False,
        description=(  # YAML lists become tuples
            "Random resized crop: the crop's area as a fraction of the image's, uniform in [min, max]."
        ),
    )
    crop_ratio: tuple[AspectRatio, AspectRatio] = Field(
        strict=False, description=("... and its aspect ratio (width / height), log-uniform in [min, max].")
    )
    hflip: Probability = Field(description="Probability of a horizontal (left-right) flip.")
    vflip: Probability = Field(description="Probability of a vertical (upside-down) flip.")
    brightness: Annotated[float, Field(ge=0, le=1)] = Field(
        description=("Add a random offset in [-b, b] x 255 to every pixel.")
    )
    contrast: Annotated[float, Field(ge=0, le=1)] = Field(
        description=("Scale each pixel's distance from the image mean by a random factor in [1-c, 1+c].")
    )
    saturation: Annotated[float, Field(ge=0, le=1)] = Field(
        description=("Scale colour saturation by a random factor in [1-s, 1+s].")
    )
    hue: Annotated[float, Field(ge=0, le=0.5)] = Field(
        description=("Turn the hue by a random fraction of the colour wheel in [-h, h].")
    )
    pca_std: Annotated[float, Field(ge=0, le=1)] = Field(
        description=(
            "AlexNet lighting: add ImageNet's RGB principal components, weighted by N(0, pca_std) x eigenvalue."
        )
    )
    online: OnlineOnlyParams

    @model_validator(mode="after")
    def _ordered_ranges(self) -> "AugmentParams":
        for name in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be [min, max] with min <= max (got {[low, high]})")
        return self

    @model_validator(mode="after")
    def _online_only_with_online_mode(self) -> "AugmentParams":
        if self.mode == "offline" and self.online.enabled:
            raise ValueError(
                f"online.{self.online.enabled[0]} runs only in the training graph, which mode offline "
                "leaves out (its variants are fixed files, and mixing labels needs the batch): "
                "set mode to online or both, or turn it off"
            )
        return self

    @property
    def offline_copies(self) -> int:
        """Random variants the augment stage writes per training image: none when augmenting online only."""
        return 0 if self.mode == "online" else self.copies


class FineTuneParams(Section):
    """Phase 2: unfreeze the top of the backbone and train it with the head on images."""

    blocks: Annotated[int, Field(ge=0)] = Field(
        description=(
            "Top blocks of the backbone to unfreeze (each backbone's blocks: [Backbones](#backbones)); 0 = no phase 2."
        )
    )
    layers: Annotated[int, Field(ge=0)] = Field(
        description=(
            "Or: top layers to unfreeze, counted like Keras's `model.layers` (set blocks or layers, not both)."
        )
    )
    epochs: Annotated[int, Field(gt=0)] = Field(description="Fine-tuning epochs, after the head's.")
    batch_size: Annotated[int, Field(gt=0)] = Field(
        description=("Per replica; images through the whole backbone need far more memory than features.")
    )
    learning_rate: Annotated[float, Field(gt=0)] = Field(
        description=("Adam's, for phase 2: below phase 1's, so the pretrained weights move only a little.")
    )
    cache_activations: bool = Field(
        description=(
            "With `blocks` and augment.mode offline, the frozen prefix's output for each image never changes: "
            "the features stage stores it (16-bit) and fine-tuning runs only the unfrozen top. false = run the "
            "whole backbone ([activation cache](training.md#activation-cache))."
        )
    )

    @model_validator(mode="after")
    def _one_way_to_count(self) -> "FineTuneParams":
        if self.blocks and self.layers:
            raise ValueError(f"set blocks or layers, not both (got blocks={self.blocks}, layers={self.layers})")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.blocks or self.layers)


class TrainParams(Section):
    """Phase 1 fits the head on the cached backbone features: the linear head is solved and reads only
    `class_weight` and `temperature_scaling`, an MLP head trains with Keras and reads them all; phase 2
    (`fine_tune`) optionally trains the top of the backbone too ([Training](training.md))."""

    epochs: Annotated[int, Field(gt=0)] = Field(
        description=("MLP head epochs (at most: early stopping may end the phase sooner).")
    )
    batch_size: Annotated[int, Field(gt=0)] = Field(
        description=("Per replica: with several GPUs the global batch is this times their number.")
    )
    learning_rate: Annotated[float, Field(gt=0)] = Field(description="Adam's, for an MLP head.")
    lr_schedule: Literal["constant", "cosine", "plateau"] = Field(
        description=(
            "`constant`; `cosine` (to 0 over the phase); `plateau` (x0.2 after 2 epochs without val_loss progress)."
        )
    )
    early_stopping_patience: Annotated[int, Field(gt=0)] | None = Field(
        description=(
            "Stop a phase after this many epochs without val_loss progress and keep its best epoch; null = off."
        )
    )
    class_weight: Literal["auto", "none"] = Field(
        description=("`auto`: weight each class by n / (classes x its count); `none`: equal weights.")
    )
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = Field(
        description=(
            "Soften the one-hot targets by this much in Keras training (an MLP head, fine-tuning); 0 = hard targets."
        )
    )
    temperature_scaling: bool = Field(
        description=(
            "After training, divide the logits by one temperature fitted on the val split: calibrated "
            "probabilities, the same predicted classes."
        )
    )
    fine_tune: FineTuneParams


class EvaluateParams(Section):
    """Scoring the exported model on the test split ([Evaluation](evaluation.md))."""

    top_k: Annotated[int, Field(ge=1)] = Field(
        description=("Also report top-k accuracy (k capped at the number of classes).")
    )
    min_accuracy: Annotated[float, Field(ge=0, le=1)] | None = Field(
        description=("null = off; e.g. 0.85 makes the evaluate stage fail below that test accuracy (a CI gate).")
    )


class LabelIssuesParams(Section):
    """The label_issues stage: held-out probabilities by k-fold, then confident learning
    ([Label issues](evaluation.md#label-issues))."""

    folds: Annotated[int, Field(ge=2)] = Field(
        description=("k of the k-fold (at most the smallest class's image count).")
    )
    max_fit_images: Annotated[int, Field(ge=1)] = Field(
        description=(
            "Past this many images, each fold's model trains on a stratified sample of this many (the summary "
            "line says so); every image is still scored."
        )
    )
    gallery: Annotated[int, Field(ge=0)] = Field(description="Top suspects drawn in reports/label_issues.png.")


Tolerance = Annotated[float, Field(gt=0, le=1)]
TfliteVariant = Literal["float32", "float16", "dynamic_range"]


class ToleranceParams(Section):
    """Largest probability difference from the Keras model allowed on any test image, per precision
    ([measured](inference.md#export))."""

    float32: Tolerance = Field(description="The SavedModel and TFLite float32 (the same arithmetic in another order).")
    float16: Tolerance = Field(description="TFLite float16.")
    dynamic_range: Tolerance = Field(description="TFLite dynamic_range.")


class ExportParams(Section):
    """The export stage writes data/export/saved_model and one TFLite file per variant, then checks each
    against the Keras model on the test images ([Export](inference.md#export))."""

    tflite: tuple[TfliteVariant, ...] = Field(
        strict=False,
        description=(  # YAML lists become tuples
            "TFLite variants: `float32`; `float16` (weights as float16: half the size); `dynamic_range` (weights "
            "as int8: a quarter). The last two need trained weights, and how well they hold depends on the backbone."
        ),
    )
    tolerance: ToleranceParams

    @field_validator("tflite")
    @classmethod
    def _each_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) < len(value):
            raise ValueError(f"lists a variant more than once (got {list(value)})")
        return value


# Test metrics evaluate may rank a new version against @champion by, and whether higher is better.
CHAMPION_METRICS = {"accuracy": True, "macro_f1": True, "log_loss": False, "ece": False}


class MlflowParams(Section):
    """Where runs and models go in MLflow ([MLflow](mlflow.md))."""

    experiment_name: str | None = Field(
        min_length=1,
        description=(
            "null = <dataset>-<source hash>: the dataset's name, from data.url (flower_photos.tgz -> "
            "flower_photos), and 6 hex digits of data.url (no credentials, query values masked): flower_photos-b28381."
        ),
    )
    registered_model_name: str | None = Field(
        min_length=1, description=("null = <dataset>-<source hash>-classifier (the Keras flavor: <name>-keras).")
    )
    register_model: bool = Field(description="false = log the model with the run without registering it.")
    system_metrics: bool = Field(
        description=("false = no system/* metrics (CPU, memory, disk, network, GPU) in the run.")
    )
    champion_metric: Literal[tuple(CHAMPION_METRICS)] = Field(  # type: ignore[valid-type]
        description=(
            "The test metric a new model must beat the current @champion's by, on the same prepared data, to "
            "take the alias (ties: log loss); otherwise it stays @candidate."
        )
    )


class Config(Section):
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] = Field(
        description=(
            "One seed for splitting, augmentation and training: same seed and inputs, same split, same augmented "
            "files and, on a CPU, the same model."
        )
    )
    data: DataParams
    prepare: PrepareParams
    model: ModelParams
    augment: AugmentParams
    train: TrainParams
    evaluate: EvaluateParams
    label_issues: LabelIssuesParams
    export: ExportParams
    mlflow: MlflowParams

    @model_validator(mode="after")
    def _fine_tune_blocks_exist(self) -> "Config":
        blocks, asked = len(self.model.spec.blocks), self.train.fine_tune.blocks
        if asked > blocks:
            raise ValueError(
                f"train.fine_tune.blocks={asked}, but {self.model.backbone} has {blocks} blocks "
                f"(docs/params.md: Backbones); use at most {blocks}"
            )
        return self

    @model_validator(mode="after")
    def _online_layers_have_a_phase_to_run_in(self) -> "Config":
        # The head phase trains on cached features of fixed images; only fine-tuning sees the images.
        # (mode both without it still trains on the offline variants.)
        if self.augment.mode == "online" and not self.train.fine_tune.enabled:
            raise ValueError(
                "augment.mode=online: the online layers run only while fine-tuning (the head phase "
                "trains on cached features of fixed images), which train.fine_tune leaves off, so "
                "nothing would be augmented: set train.fine_tune.blocks (or layers) above 0, or "
                "augment.mode to offline or both"
            )
        return self

    @property
    def activation_cut(self) -> str | None:
        """The block whose output the features stage caches for fine-tuning, or None when there is none.

        Caching needs a clean cut (``fine_tune.blocks``, not ``layers``, and not every block) and
        inputs that are the same every epoch (offline augmentation only: online layers change them).
        """
        fine_tune, blocks = self.train.fine_tune, self.model.spec.blocks
        if not (fine_tune.cache_activations and self.augment.mode == "offline" and 0 < fine_tune.blocks < len(blocks)):
            return None
        return blocks[-fine_tune.blocks - 1]

    @property
    def dataset_name(self) -> str:
        """The data's own name, from ``data.url``: its archive's or folder's name (``flower_photos.tgz``
        -> ``flower_photos``; ``cats_vs_dogs/train`` -> ``cats_vs_dogs``), as a name MLflow takes."""
        url = urlsplit(self.data.url)
        path = PurePosixPath(unquote(url.path if url.scheme in ("http", "https", "file") else self.data.url))
        parts = [part for part in path.parts if part not in ("/", "")] or ["dataset"]
        suffix = next((s for s in ARCHIVE_SUFFIXES if parts[-1].lower().endswith(s)), "")
        name = parts[-1][: len(parts[-1]) - len(suffix)]
        if name.lower() in SPLIT_NAMES and len(parts) > 1:  # a split folder of a bigger dataset
            name = parts[-2]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "dataset"

    @property
    def source_id(self) -> str:
        """A short hash of where the data comes from (``data.url`` without credentials, query values
        masked, so a re-signed URL keeps its id): two sources whose folders share a name get
        different default MLflow names."""
        location = urlsplit(redact_url(self.data.url))
        location = location._replace(netloc=location.netloc.rpartition("@")[2])  # no user name either
        return hashlib.sha256(urlunsplit(location).encode()).hexdigest()[:SHORT_HASH]

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment runs go to: ``mlflow.experiment_name``, else ``<dataset>-<source_id>``
        (``flower_photos-1a2b3c``), so that other data never piles into this data's experiment."""
        return self.mlflow.experiment_name or f"{self.dataset_name}-{self.source_id}"

    @property
    def registered_model_name(self) -> str | None:
        """The model registry name of the servable model (the Keras flavor adds ``-keras``):
        ``mlflow.registered_model_name``, else ``<dataset>-<source_id>-classifier``; None when
        ``mlflow.register_model`` is false."""
        if not self.mlflow.register_model:
            return None
        return self.mlflow.registered_model_name or f"{self.dataset_name}-{self.source_id}-classifier"

    @property
    def params_id(self) -> str:
        """A short hash of the params a trained model depends on (seed, data, prepare, model, augment,
        train): runs with the same id trained from the same settings."""
        shaping = self.model_dump(mode="json", include={"seed", "data", "prepare", "model", "augment", "train"})
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:SHORT_HASH]

    @property
    def run_name(self) -> str:
        """The MLflow run name of a run outside a DVC experiment: ``<dataset>-params-<params_id>``."""
        return f"{self.dataset_name}-params-{self.params_id}"

    def flat(self) -> dict[str, Any]:
        """Params as dotted names (``train.learning_rate``), the way MLflow and DVC show them."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], separator: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, each key the path of its value: ``{"train.epochs": 10}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, separator, f"{prefix}{key}{separator}"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def committed_params(path: Path = PARAMS_FILE) -> dict[str, Any] | None:
    """params.yaml as committed at git's HEAD, flattened, or None outside git or before a first commit."""
    shown = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True)
    return flatten(yaml.safe_load(shown.stdout) or {}) if shown.returncode == 0 else None


def differences(params: dict[str, Any], reference: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Flat params whose value differs from ``reference``'s: key -> (value, reference's value)."""
    return {key: (value, reference.get(key)) for key, value in sorted(params.items()) if value != reference.get(key)}


def override_params(path: Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys (``train.epochs``) in a params file, as ``dvc exp run -S key=value`` does."""
    params = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = params
        for section in sections:
            node = node[section]
        node[leaf] = value
    Path(path).write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def load_config(path: Path = PARAMS_FILE) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
        raw = yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader that also refuses aliases
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root (where dvc.yaml is)") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        started = f" ({err.context} on line {err.context_mark.line + 1})" if err.context and err.context_mark else ""
        raise UserError(f"{path}:{mark.line + 1}: not valid YAML: {err.problem or err.context}{started}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        return Config.model_validate(raw or {})
    except ValidationError as err:
        first = err.errors()[0]
        line = line_of(text, first["loc"])
        raise UserError(f"{path}{f':{line}' if line else ''}: {_error_text(first)}") from None


class NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name``): a few lines of them can expand into
    billions of values (a "billion laughs" file). params.yaml never needs one."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.MarkedYAMLError(
                problem="aliases (*name) are not allowed: write the value out",
                problem_mark=self.peek_event().start_mark,
            )
        return super().compose_node(parent, index)


def line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the dotted key ``loc`` in the YAML ``text`` (the deepest part of it found)."""
    node, line = yaml.compose(text, Loader=NoAliasLoader), None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _error_text(first: ErrorDetails) -> str:
    """A validation problem as one line: the dotted key, what is wrong, and what was given."""
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{key}' (allowed here: {', '.join(_keys_beside(first['loc']))})"
    if first["type"] == "missing":
        return f"missing key '{key}'"
    message = first["msg"].removeprefix("Value error, ")
    if isinstance(first["input"], dict):  # a check across a section's keys: the message names them
        return message if not first["loc"] else f"{key}: {message}"
    given = repr(first["input"])
    return f"{key}: {message} (got {given if len(given) <= MAX_QUOTED else given[:MAX_QUOTED] + '...'})"


def _keys_beside(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section that holds ``loc``."""
    section: type[BaseModel] = Config
    for part in loc[:-1]:
        section = cast(type[BaseModel], section.model_fields[part].annotation)
    return list(section.model_fields)


if __name__ == "__main__":  # `python -m pipeline.config registered_model_name`: a derived setting, for make
    print(getattr(load_config(), sys.argv[1]))
