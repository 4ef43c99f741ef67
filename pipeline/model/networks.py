"""Keras models built from the backbone registry: feature extractor, head, fine-tuning, exported model.

The exported model takes raw RGB uint8 images of any size: resizing (center crop to square) and the
backbone's ``preprocess_input`` are layers inside it, built only from core Keras layers so it loads
with ``keras.saving.load_model(safe_mode=True)`` and no code of ours. The pipeline itself always
feeds it ``images.model_input`` at its input size (``input_size``), which the resize layer leaves as is.
Its shape, which ``pipeline.report.gradcam`` relies on: ``image -> resize -> extractor -> head``, where the
extractor is ``preprocess -> backbone -> pool`` and the head a chain ending in ``probabilities``.
"""

import contextlib
import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, cast

import keras
import numpy as np

from pipeline.cli import UserError, first_line
from pipeline.config import FineTuneParams, HeadParams, ModelParams
from pipeline.files import sha256_of
from pipeline.model import feature_store
from pipeline.model.backbones import Backbone

IMAGENET_BGR_MEANS = np.array([103.939, 116.779, 123.68], dtype="float32")


def preprocessing(spec: Backbone) -> keras.layers.Layer:
    """The backbone's ``preprocess_input`` as one serializable, frozen layer."""
    if spec.preprocessing == "included":  # the application's own layers do it; kept so the layer has a home
        return keras.layers.Identity(name="preprocess")
    if spec.preprocessing == "tf":
        return keras.layers.Rescaling(scale=1 / 127.5, offset=-1.0, name="preprocess")
    # "caffe": RGB -> BGR and subtract the channel means, i.e. a fixed 1x1 convolution.
    layer = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False)
    layer.build((None, None, None, 3))
    rgb_to_bgr = np.eye(3, dtype="float32")[::-1].reshape(1, 1, 3, 3)
    layer.set_weights([rgb_to_bgr, -IMAGENET_BGR_MEANS])
    return layer


def backbone(params: ModelParams) -> keras.Model:
    """``keras.applications`` base without its classifier, frozen, with the requested weights."""
    spec = params.spec
    application = getattr(keras.applications, spec.application)
    size = params.input_size
    weights = {"imagenet": "imagenet", "none": None}.get(params.weights, params.weights)
    width = {} if params.width is None else {"alpha": params.width}
    # Keras warns once per layer it cannot fill from a weights file before it raises: keep those
    # for our one-line error instead of printing a wall of them, and treat a partial load as a misfit.
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always", UserWarning)
        try:
            base = application(include_top=False, weights=weights, input_shape=(size, size, 3), **width)
        except Exception as err:  # Keras raises bare Exception/ValueError for download and shape problems
            raise UserError(_weights_problem(params, err)) from None
    not_loaded = [w for w in skipped if "could not be loaded" in str(w.message) or "Skipping" in str(w.message)]
    if not_loaded:
        raise UserError(_weights_problem(params, cast(Warning, not_loaded[0].message)))  # a str only if warned so
    base.trainable = False
    return base


def imagenet_classifier(params: ModelParams, weights: str) -> keras.Model:
    """The backbone with its original 1,000-class ImageNet classifier, at its native size: pixels
    (0..255) in, ImageNet probabilities out. ``weights``: ``imagenet`` (Keras downloads them) or a
    weights file saved with the top (``include_top=True``)."""
    spec = params.spec
    width = {} if params.width is None else {"alpha": params.width}
    size = spec.native_size
    try:
        top = getattr(keras.applications, spec.application)(
            include_top=True, weights=weights, classes=1000, input_shape=(size, size, 3), **width
        )
    except Exception as err:  # Keras raises bare Exception/ValueError for download and shape problems
        raise UserError(
            f"--imagenet: {weights} does not load into {params.architecture} with its ImageNet "
            f"classifier ({first_line(err)[:200]}): it needs weights saved with the top"
        ) from None
    inputs = keras.Input(shape=(None, None, 3), name="image")  # like the exported model: input_size() reads the resize
    x = keras.layers.Resizing(size, size, crop_to_aspect_ratio=True, name="resize")(inputs)
    return keras.Model(inputs, top(preprocessing(spec)(x), training=False), name="imagenet_classifier")


def _weights_problem(params: ModelParams, err: Exception | Warning) -> str:
    message = first_line(err)
    if params.weights == "imagenet":
        return (
            f"model.weights=imagenet: could not download the ImageNet weights for {params.architecture} "
            f"({message[:160]}); offline? set model.weights to a local weights file or to none"
        )
    return (
        f"model.weights: {params.weights} does not fit {params.architecture} without its top ({message[:200]}); "
        "set model.backbone and model.alpha to the network the file was saved from"
    )


def feature_extractor(params: ModelParams) -> keras.Model:
    """Pixels (0..255) at the input size -> pooled backbone features (what the head trains on)."""
    size = params.input_size
    inputs = keras.Input(shape=(size, size, 3), name="pixels")
    x = preprocessing(params.spec)(inputs)
    x = backbone(params)(x, training=False)  # training=False keeps BatchNorm in inference mode, even when fine-tuned
    # Pooled in float32 whatever the compute precision: features are averaged over many positions.
    outputs = keras.layers.GlobalAveragePooling2D(name="pool", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"{params.backbone}_features")


def saved_feature_extractor(params: ModelParams, features_dir: Path) -> keras.Model:
    """The extractor whose backbone made the features in ``features_dir`` (weights ``none`` is random)."""
    return feature_extractor(params.model_copy(update={"weights": str(features_dir / feature_store.BACKBONE_WEIGHTS)}))


def in_float32(params: ModelParams, extractor: keras.Model) -> keras.Model:
    """``extractor`` itself when it computes in float32, else a float32 copy with its weights: the
    exported model's precision (16-bit is slow on many CPUs)."""
    if extractor.dtype_policy.name == "float32":
        return extractor
    with dtype_policy("float32"):
        copy = feature_extractor(params.model_copy(update={"weights": "none"}))
    copy.set_weights(extractor.get_weights())
    return copy


def backbone_of(extractor: keras.Model) -> keras.Model:
    return next(layer for layer in extractor.layers if isinstance(layer, keras.Model))


class Standardization(NamedTuple):
    """Per-feature mean and variance of the training rows, as the head's ``standardize`` layer uses them."""

    mean: np.ndarray
    variance: np.ndarray


def standardization(train_features: np.ndarray) -> Standardization:
    """The training features' mean and variance (one chunked pass: a memory-mapped file is never
    copied whole). A constant feature keeps variance 1: Keras would divide it by its epsilon (1e-7),
    turning any val or test value off the constant into a huge one. Variances under Keras's floor
    (epsilon squared) are raised to it, so that ``(x - mean) / sqrt(variance)`` in numpy is what the
    layer computes (``pipeline.model.linear_head`` solves on the rows standardized so)."""
    mean, variance = column_stats(train_features)
    return Standardization(mean, np.where(variance > 0, np.maximum(variance, keras.config.epsilon() ** 2), 1.0))


def head(stats: Standardization, n_classes: int, params: HeadParams, l2: float = 0.0) -> keras.Model:
    """Standardize -> [dense ReLU] -> dropout -> softmax, over pooled features; float32 even in mixed precision.

    Standardizing with the training features' mean and variance (``stats``, constants, not trained)
    puts every backbone's features on one scale: random-init backbones (``model.weights: none``)
    emit features around 1e-4, ImageNet ones around 1. ``l2``: the L2 penalty on the dense layers'
    kernels (per training row, ``keras.regularizers.L2``) in training: the strength the head phase
    chose on the val split, kept through fine-tuning; none in inference.
    """
    regularizer = keras.regularizers.L2(l2) if l2 else None
    inputs = keras.Input(shape=(len(stats.mean),), name="features")
    x = keras.layers.Normalization(mean=stats.mean, variance=stats.variance, name="standardize", dtype="float32")(
        inputs
    )
    if params.dense_units:
        x = keras.layers.Dense(
            params.dense_units, activation="relu", kernel_regularizer=regularizer, name="hidden", dtype="float32"
        )(x)
    x = keras.layers.Dropout(params.dropout, name="dropout", dtype="float32")(x)
    outputs = keras.layers.Dense(
        n_classes, activation="softmax", kernel_regularizer=regularizer, name="probabilities", dtype="float32"
    )(x)
    return keras.Model(inputs, outputs, name="head")  # found by this name in the exported model (head_of)


def fold_temperature(head_model: keras.Model, temperature: float) -> None:
    """Divide the logits of ``head_model``'s softmax layer by ``temperature`` (its kernel and bias):
    calibration with no extra layer in the exported model, and the same most probable class."""
    layer = head_model.get_layer("probabilities")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / temperature, bias / temperature])


def column_stats(rows: np.ndarray, chunk_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and variance, a chunk at a time (Chan et al.'s merge), so that a memory-mapped
    feature file larger than RAM is read once and never copied whole."""
    count, mean, squares = 0, np.zeros(rows.shape[1]), np.zeros(rows.shape[1])  # squares: sum of squared deviations
    for start in range(0, len(rows), chunk_rows):
        block = np.asarray(rows[start : start + chunk_rows], dtype="float64")
        block_mean = block.mean(axis=0)
        delta, total = block_mean - mean, count + len(block)
        squares += ((block - block_mean) ** 2).sum(axis=0) + delta**2 * count * len(block) / total
        mean += delta * len(block) / total
        count = total
    return mean, squares / max(count, 1)


def classifier(extractor: keras.Model, head_model: keras.Model, size: int) -> keras.Model:
    """The exported model: raw uint8 images of any size -> class probabilities.

    The pipeline (server, predict, evaluate, export) feeds it images.model_input at ``size``, which
    the resize layer leaves exactly as they are. Other sizes are center-cropped and resized in the
    graph, bilinear without antialiasing: close to, but not, what it was trained and evaluated on.
    """
    inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    x = keras.layers.Resizing(size, size, crop_to_aspect_ratio=True, name="resize")(inputs)
    # training=False pinned: Keras 3.15 would otherwise let a plain model(x) call run Dropout.
    return keras.Model(inputs, head_model(extractor(x, training=False), training=False), name="classifier")


def head_of(model: keras.Model) -> keras.Model:
    """``classifier``'s (or ``after_backbone``'s) head: pooled backbone features -> class probabilities."""
    return model.get_layer("head")


def after_backbone(model: keras.Model, lineage: str) -> keras.Model:
    """``classifier``'s layers after the backbone: its pooling, then its head (the same layers, not
    copies): the backbone's last feature maps -> class probabilities. Saved beside a model whose
    backbone is the features stage's, it scores that stage's backbone outputs without loading the
    backbone (evaluate). Named after ``lineage`` (:func:`after_backbone_lineage`), so that it is
    never taken for another model's head, nor used on another backbone's outputs."""
    extractor = next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "head")
    maps = keras.Input(shape=backbone_of(extractor).output.shape[1:], name="feature_maps")
    pooled = extractor.get_layer("pool")(maps)
    return keras.Model(maps, head_of(model)(pooled, training=False), name=f"after_backbone_{lineage}")


def after_backbone_lineage(model_file: Path, backbone_weights: Path) -> str:
    """The saved model and the backbone weights (the features store's) an ``after_backbone`` goes
    with, by their sha256 (one digest of both)."""
    return hashlib.sha256(f"{sha256_of(model_file)} {sha256_of(backbone_weights)}".encode()).hexdigest()


def load_after_backbone(path: Path, lineage: str) -> keras.Model | None:
    """The model ``after_backbone`` saved in ``path``, or None when there is none or it goes with
    another model or backbone than ``lineage`` says (a model file replaced by hand, features rerun
    without train)."""
    if not path.is_file():
        return None
    after = load(path)
    return after if after.name == f"after_backbone_{lineage}" else None


def input_size(model: keras.Model) -> int:
    """The side of the square images ``model`` (``classifier``'s) was trained on: feed it
    images.model_input at this size, which its resize layer leaves as they are."""
    return model.get_layer("resize").height


def on_pixels(
    extractor: keras.Model, head_model: keras.Model, size: int, augmentation: keras.Sequential | None = None
) -> keras.Model:
    """The fine-tuning model: float pixels at the input size -> [online augmentation] -> probabilities."""
    inputs = keras.Input(shape=(size, size, 3), name="pixels")
    x = augmentation(inputs) if augmentation is not None else inputs
    return keras.Model(inputs, head_model(extractor(x)), name="fine_tune")


# ---- fine-tuning: the split between a frozen prefix and a trainable top ------------------------


def split_at(base: keras.Model, cut: str) -> tuple[keras.Model, keras.Model]:
    """The backbone as ``prefix`` (input -> output of layer ``cut``) and ``top`` (that -> output).

    Both share ``base``'s layers: training ``top`` trains the backbone itself. ``cut`` must be a
    block end (``backbones.py``), the only tensor the layers above it read.
    """
    boundary = base.get_layer(cut).output
    return keras.Model(base.input, boundary, name="prefix"), keras.Model(boundary, base.output, name="top")


def with_activations(extractor: keras.Model, cut: str) -> keras.Model:
    """The extractor with a second output, the activations at ``cut``: one pass gives both."""
    prefix, top = split_at(backbone_of(extractor), cut)
    inputs = keras.Input(shape=extractor.input_shape[1:], name="pixels")
    activations = prefix(extractor.get_layer("preprocess")(inputs), training=False)
    features = extractor.get_layer("pool")(top(activations, training=False))
    return keras.Model(inputs, [features, activations], name=f"{extractor.name}_and_activations")


def on_activations(extractor: keras.Model, head_model: keras.Model, cut: str) -> keras.Model:
    """The cached fine-tuning model: activations at ``cut`` -> unfrozen top -> pool -> head."""
    _, top = split_at(backbone_of(extractor), cut)
    inputs = keras.Input(shape=top.input_shape[1:], name="activations")
    features = extractor.get_layer("pool")(top(inputs, training=False))
    return keras.Model(inputs, head_model(features), name="fine_tune_cached")


def trainable_top_start(base: keras.Model, spec: Backbone, fine_tune: FineTuneParams) -> int:
    """Index in ``base.layers`` of the first layer to train; everything below it stays frozen.

    With ``blocks`` the split is the end of the last frozen block, a single tensor (a frozen prefix
    whose output could be cached); with ``layers`` it is simply that many layers from the top.
    """
    if fine_tune.blocks:  # at most len(spec.blocks): the config checked it
        if fine_tune.blocks == len(spec.blocks):
            return 1  # every block: all but the input layer
        last_frozen = spec.blocks[-fine_tune.blocks - 1]
        return [layer.name for layer in base.layers].index(last_frozen) + 1
    if fine_tune.layers >= len(base.layers):
        raise UserError(
            f"train.fine_tune.layers={fine_tune.layers}, but {spec.name} has "
            f"{len(base.layers) - 1} layers besides its input"
        )
    return len(base.layers) - fine_tune.layers


def unfreeze_top(base: keras.Model, start: int) -> None:
    """Make ``base.layers[start:]`` trainable, except BatchNormalization layers.

    Their statistics and scales were fitted on far more data than ours; the backbone is also always
    called with ``training=False``, so they keep running in inference mode.
    """
    base.trainable = True
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)


# ---- precision --------------------------------------------------------------------------------

# CPU flags of the units that run bfloat16 natively (oneDNN uses them): Intel AMX and AVX512-BF16.
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def compute_policy(params: ModelParams) -> str:
    """The Keras dtype policy ``params.precision`` asks for; ``auto`` picks the fastest safe one here.

    Mixed policies compute in 16 bits and keep the weights in float32. float16 needs loss scaling
    (Keras adds it) and is only fast on GPUs; bfloat16 keeps float32's range, and CPUs with AMX or
    AVX512-BF16 run most backbones faster in it than in float32 (1.1-1.9x, bench/results.md), though
    not all (``Backbone.cpu_bfloat16``). Elsewhere float32 is the fast one.
    """
    if params.precision != "auto":
        return params.precision
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    bfloat16_units = any(flag in _cpu_flags() for flag in BFLOAT16_CPU_FLAGS)
    return "mixed_bfloat16" if bfloat16_units and params.spec.cpu_bfloat16 else "float32"


def use_precision(params: ModelParams) -> str:
    """Build every later layer under ``model.precision``'s policy; returns the policy's name."""
    policy = compute_policy(params)
    keras.config.set_dtype_policy(policy)
    return policy


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return {flag for line in fh if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:  # not Linux: no cheap way to ask, stay with float32
        return set()


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under the dtype policy ``name`` (e.g. float32 while training in mixed precision)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# The Keras models this process is logging to MLflow, by model URI (``logging_as``). MLflow checks a
# logged model by loading it and predicting its input example; ``serving.load_keras_model`` then
# takes the model from here rather than read a second copy back from the store (~0.6 s of train).
LOGGING: dict[str, keras.Model] = {}


@contextlib.contextmanager
def logging_as(uri: str, model: keras.Model) -> Iterator[None]:
    """While the block runs, ``model`` is what loading the logged model ``uri`` in this process gives."""
    LOGGING[uri] = model
    try:
        yield
    finally:
        del LOGGING[uri]


def load(path: Path) -> keras.Model:
    """Load a .keras file in Keras safe mode: a file carrying Python code (Lambda layers) is refused."""
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)  # to predict, not to train on
    except ValueError as err:
        if "safe_mode" not in str(err):
            raise
        raise UserError(
            f"{path} contains Python code (a Lambda layer); refusing to run it (Keras safe mode): "
            "load only models you trust, built from Keras layers"
        ) from None
