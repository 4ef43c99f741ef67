"""The one typed, validated view of ``params.yaml``.

Every stage calls :func:`load_config` first, so a wrong key or value fails before any work starts,
with one line naming the key and what is allowed. Types, ranges and derived values live here; what
each param means, and its value, live in params.yaml alone (its comments; tests/test_params_doc.py),
so no field has a default here.
"""

import re
import sys
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.cli import UserError
from pipeline.model.backbones import BACKBONES, Backbone
from pipeline.paths import SPLIT_NAMES

PARAMS_FILE = Path("params.yaml")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")  # what data.url may end in besides a folder
MAX_QUOTED = 80  # characters of a wrong value quoted in an error message
SEED_LIMIT = 2**32  # numpy, TensorFlow and albumentations all take seeds below this

Fraction = Annotated[float, Field(gt=0, lt=1)]
AreaFraction = Annotated[float, Field(gt=0, le=1)]
BackboneName = Literal[tuple(BACKBONES)]  # type: ignore[valid-type]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(Section):
    url: str = Field(min_length=1)
    sha256: str | None = Field(pattern=r"^[0-9a-f]{64}$")
    max_per_class: Annotated[int, Field(gt=0)] | None
    max_files: Annotated[int, Field(gt=0)]
    max_bytes: Annotated[int, Field(gt=0)]
    labels: str | None = Field(min_length=1)
    class_depth: Annotated[int, Field(ge=1, le=16)]


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
    max_side: Annotated[int, Field(ge=32)]
    min_side: Annotated[int, Field(ge=1)]
    near_duplicate_distance: Annotated[int, Field(ge=0, le=64)]


class HeadParams(Section):
    """The new classifier on the pooled backbone features (pipeline.model.networks.head)."""

    dense_units: Annotated[int, Field(ge=0)]
    dropout: Annotated[float, Field(ge=0, lt=1)]


# The largest model.image_size: over 3 times every backbone's native size (224-300 px), which is
# what its ImageNet features were learned at; memory and time per image grow with the square of the
# side (11 times 299 px's at 1024), so larger sizes cost far more than they can give.
MAX_IMAGE_SIZE = 1024


class ModelParams(Section):
    backbone: BackboneName
    weights: str = Field(min_length=1)
    image_size: Annotated[int, Field(gt=0)] | None
    alpha: float | None
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
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size {self.image_size} is above the largest size, {MAX_IMAGE_SIZE} (ImageNet "
                             f"backbones are trained at 224-300 px; memory grows with the square of the side): lower it")
        return self

    @model_validator(mode="after")
    def _alpha_fits_backbone(self) -> "ModelParams":
        alphas = BACKBONES[self.backbone].alphas
        if self.alpha is not None and not alphas:
            raise ValueError(f"alpha {self.alpha}: {self.backbone} has no width multiplier; set alpha to null")
        if self.alpha is not None and self.alpha not in alphas:
            allowed = ", ".join(str(a) for a in sorted(alphas))
            raise ValueError(f"alpha {self.alpha} is not one of {self.backbone}'s widths ({allowed}; null = {alphas[0]})")
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
    """Core Keras 3 layers with no offline counterpart (the ones keras-cv had): RandAugment, MixUp, CutMix."""

    rand_augment_ops: Annotated[int, Field(ge=0, le=11)]  # RandAugment has 11 operations
    rand_augment_factor: Annotated[float, Field(gt=0, le=1)]
    mix: Literal["none", "mixup", "cutmix"]
    mix_alpha: Annotated[float, Field(gt=0)]

    @property
    def enabled(self) -> list[str]:
        """The options that are on, as ``name=value``, for messages."""
        return [f"{name}={value}" for name, value in (("rand_augment_ops", self.rand_augment_ops), ("mix", self.mix))
                if value not in (0, "none")]


class AugmentParams(Section):
    """One policy for the offline augment stage and the online training layers (pipeline/data/augmentation.py)."""

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
            raise ValueError(f"online.{self.online.enabled[0]} runs only in the training graph, which mode offline "
                             "leaves out (its variants are fixed files, and mixing labels needs the batch): "
                             "set mode to online or both, or turn it off")
        return self

    @property
    def offline_copies(self) -> int:
        """Random variants the augment stage writes per training image: none when augmenting online only."""
        return 0 if self.mode == "online" else self.copies


class FineTuneParams(Section):
    """Phase 2: unfreeze the top of the backbone and train it with the head on images."""

    blocks: Annotated[int, Field(ge=0)]
    layers: Annotated[int, Field(ge=0)]
    epochs: Annotated[int, Field(gt=0)]
    batch_size: Annotated[int, Field(gt=0)]
    learning_rate: Annotated[float, Field(gt=0)]
    cache_activations: bool

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
    batch_size: Annotated[int, Field(gt=0)]
    learning_rate: Annotated[float, Field(gt=0)]
    lr_schedule: Literal["constant", "cosine", "plateau"]
    early_stopping_patience: Annotated[int, Field(gt=0)] | None
    class_weight: Literal["auto", "none"]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    temperature_scaling: bool
    fine_tune: FineTuneParams


class EvaluateParams(Section):
    top_k: Annotated[int, Field(ge=1)]
    min_accuracy: Annotated[float, Field(ge=0, le=1)] | None


class LabelIssuesParams(Section):
    """The label_issues stage: held-out probabilities by k-fold, then confident learning."""

    folds: Annotated[int, Field(ge=2)]
    gallery: Annotated[int, Field(ge=0)]


Tolerance = Annotated[float, Field(gt=0, le=1)]
TfliteVariant = Literal["float32", "float16", "dynamic_range"]


class ToleranceParams(Section):
    """Largest probability difference from the Keras model allowed on any test image, per precision."""

    float32: Tolerance
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
    experiment_name: str | None = Field(min_length=1)
    registered_model_name: str | None = Field(min_length=1)
    register_model: bool
    system_metrics: bool


class Config(Section):
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
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
            raise ValueError(f"train.fine_tune.blocks={asked}, but {self.model.backbone} has {blocks} blocks "
                             f"(README: the backbone table); use at most {blocks}")
        return self

    @model_validator(mode="after")
    def _online_layers_have_a_phase_to_run_in(self) -> "Config":
        # The head phase trains on cached features of fixed images; only fine-tuning sees the images.
        # (mode both without it still trains on the offline variants.)
        if self.augment.mode == "online" and not self.train.fine_tune.enabled:
            raise ValueError("augment.mode=online: the online layers run only while fine-tuning (the head phase "
                             "trains on cached features of fixed images), which train.fine_tune leaves off, so "
                             "nothing would be augmented: set train.fine_tune.blocks (or layers) above 0, or "
                             "augment.mode to offline or both")
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
    def experiment_name(self) -> str:
        """The MLflow experiment runs go to: ``mlflow.experiment_name``, else the dataset's name, so a
        second dataset does not pile into the first one's experiment."""
        return self.mlflow.experiment_name or self.dataset_name

    @property
    def registered_model_name(self) -> str | None:
        """The model registry name of the servable model (the Keras flavor adds ``-keras``), None when
        ``mlflow.register_model`` is false."""
        if not self.mlflow.register_model:
            return None
        return self.mlflow.registered_model_name or f"{self.dataset_name}-classifier"

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
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed: write the value out",
                                       problem_mark=self.peek_event().start_mark)
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


def _error_text(first: dict[str, Any]) -> str:
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
        section = section.model_fields[part].annotation
    return list(section.model_fields)


if __name__ == "__main__":  # `python -m pipeline.config registered_model_name`: a derived setting, for make
    print(getattr(load_config(), sys.argv[1]))
