"""The one typed, validated view of ``params.yaml``.

Every stage calls :func:`load_config` first, so a wrong key or value fails before any work starts,
with one line naming the key and what is allowed.
"""

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.backbones import BACKBONES, Backbone
from pipeline.cli import UserError

PARAMS_FILE = Path("params.yaml")

Fraction = Annotated[float, Field(gt=0, lt=1)]
AreaFraction = Annotated[float, Field(gt=0, le=1)]
BackboneName = Literal[tuple(BACKBONES)]  # type: ignore[valid-type]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(Section):
    url: str = Field(min_length=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    max_per_class: Annotated[int, Field(gt=0)] | None = None
    max_files: Annotated[int, Field(gt=0)] = 1_000_000  # archive bomb caps: files and bytes unpacked
    max_bytes: Annotated[int, Field(gt=0)] = 20_000_000_000


class SplitParams(Section):
    val: Fraction
    test: Fraction

    @model_validator(mode="after")
    def _leave_room_for_train(self) -> "SplitParams":
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be below 1 so that some images train (got {self.val + self.test:g})")
        return self


class PrepareParams(Section):
    split: SplitParams
    max_side: Annotated[int, Field(ge=32)]  # longest side of the normalized images
    min_side: Annotated[int, Field(ge=1)] = 32  # images with a shorter side are quarantined
    near_duplicate_distance: Annotated[int, Field(ge=0, le=64)] = 6  # perceptual-hash bits


class HeadParams(Section):
    """The new classifier on the pooled backbone features (pipeline.models.head)."""

    dense_units: Annotated[int, Field(ge=0)]  # 0 = softmax right on the features; else one ReLU layer this wide first
    dropout: Annotated[float, Field(ge=0, lt=1)]  # dropout before the softmax layer


class ModelParams(Section):
    backbone: BackboneName
    weights: str = Field(min_length=1)  # imagenet | none | path to a weights file
    image_size: Annotated[int, Field(gt=0)] | None = None
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
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
        return self

    @property
    def spec(self) -> Backbone:
        return BACKBONES[self.backbone]

    @property
    def input_size(self) -> int:
        """The size images are fed at: ``image_size``, or the backbone's native size when null."""
        return self.image_size or self.spec.native_size


Probability = Annotated[float, Field(ge=0, le=1)]
AspectRatio = Annotated[float, Field(gt=0, le=10)]


class AugmentParams(Section):
    """One policy for the offline augment stage and the online training layers (pipeline/augmentation.py)."""

    mode: Literal["offline", "online", "both"]
    copies: Annotated[int, Field(ge=0, le=100)]
    crop_scale: tuple[AreaFraction, AreaFraction] = Field(strict=False)  # YAML lists become tuples
    crop_ratio: tuple[AspectRatio, AspectRatio] = Field(strict=False)
    hflip: Probability
    vflip: Probability
    brightness: Annotated[float, Field(ge=0, le=1)]
    contrast: Annotated[float, Field(ge=0, le=1)]
    saturation: Annotated[float, Field(ge=0, le=1)]
    hue: Annotated[float, Field(ge=0, le=0.5)]
    pca_std: Annotated[float, Field(ge=0, le=1)]

    @model_validator(mode="after")
    def _ordered_ranges(self) -> "AugmentParams":
        for name in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be [min, max] with min <= max (got {[low, high]})")
        return self

    @property
    def offline_copies(self) -> int:
        """Random variants the augment stage writes per training image: none when augmenting online only."""
        return 0 if self.mode == "online" else self.copies


class FineTuneParams(Section):
    """Phase 2: unfreeze the top of the backbone and train it with the head on images."""

    blocks: Annotated[int, Field(ge=0)]  # top named blocks to unfreeze (backbones.py); 0 = no fine-tuning
    layers: Annotated[int, Field(ge=0)]  # or: top layers to unfreeze, counted like model.layers; 0 = unused
    epochs: Annotated[int, Field(gt=0)]
    batch_size: Annotated[int, Field(gt=0)]  # per replica, like train.batch_size
    learning_rate: Annotated[float, Field(gt=0)]
    cache_activations: bool  # fine-tune the top on the frozen prefix's cached outputs, when possible

    @model_validator(mode="after")
    def _one_way_to_count(self) -> "FineTuneParams":
        if self.blocks and self.layers:
            raise ValueError(f"set blocks or layers, not both (got blocks={self.blocks}, layers={self.layers})")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.blocks or self.layers)


class TrainParams(Section):
    epochs: Annotated[int, Field(gt=0)]
    batch_size: Annotated[int, Field(gt=0)]  # per replica: the global batch is this times the GPUs used
    learning_rate: Annotated[float, Field(gt=0)]
    lr_schedule: Literal["constant", "cosine", "plateau"]
    early_stopping_patience: Annotated[int, Field(gt=0)] | None  # null = train every epoch
    class_weight: Literal["auto", "none"]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    fine_tune: FineTuneParams


class EvaluateParams(Section):
    top_k: Annotated[int, Field(ge=1)]
    min_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None


Tolerance = Annotated[float, Field(gt=0, le=1)]
TfliteVariant = Literal["float32", "float16", "dynamic_range"]


class ToleranceParams(Section):
    """Largest probability difference from the Keras model allowed on any test image, per precision."""

    float32: Tolerance  # the SavedModel and TFLite float32
    float16: Tolerance
    dynamic_range: Tolerance


class ExportParams(Section):
    tflite: tuple[TfliteVariant, ...] = Field(strict=False)  # YAML lists become tuples
    tolerance: ToleranceParams

    @field_validator("tflite")
    @classmethod
    def _each_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) < len(value):
            raise ValueError(f"lists a variant more than once (got {list(value)})")
        return value


class MlflowParams(Section):
    experiment_name: str = Field(min_length=1)
    registered_model_name: str | None = None


class Config(Section):
    seed: Annotated[int, Field(ge=0)]
    data: DataParams
    prepare: PrepareParams
    model: ModelParams
    augment: AugmentParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    mlflow: MlflowParams

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

    def flat(self) -> dict[str, Any]:
        """Params as dotted names (``train.learning_rate``), the way MLflow and DVC show them."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root (where dvc.yaml is)") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        return Config.model_validate(raw or {})
    except ValidationError as err:
        raise UserError(f"{path}: {_describe(err)}") from None


def _describe(err: ValidationError) -> str:
    """The first problem as one line: the dotted key, what is wrong, and what was given."""
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{key}' (allowed here: {', '.join(_keys_beside(first['loc']))})"
    if first["type"] == "missing":
        return f"missing key '{key}'"
    message = first["msg"].removeprefix("Value error, ")
    if isinstance(first["input"], dict):  # a check across a section's keys: the message names them
        return f"{key}: {message}"
    return f"{key}: {message} (got {first['input']!r})"


def _keys_beside(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section that holds ``loc``."""
    section: type[BaseModel] = Config
    for part in loc[:-1]:
        section = section.model_fields[part].annotation
    return list(section.model_fields)
