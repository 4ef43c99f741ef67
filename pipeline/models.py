"""Keras models built from the backbone registry: feature extractor, head, and the exported model.

The exported model takes raw RGB uint8 images of any size: resizing (center crop to square, like
the augment stage) and the backbone's ``preprocess_input`` are layers inside it, built only from
core Keras layers so it loads with ``keras.saving.load_model(safe_mode=True)`` and no code of ours.
"""

from pathlib import Path

import keras
import numpy as np

from pipeline.backbones import Backbone
from pipeline.cli import UserError
from pipeline.config import ModelParams

IMAGENET_BGR_MEANS = np.array([103.939, 116.779, 123.68], dtype="float32")


def preprocessing(spec: Backbone) -> keras.layers.Layer:
    """The backbone's ``preprocess_input`` as one serializable, frozen layer."""
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
    try:
        base = application(include_top=False, weights=weights, input_shape=(size, size, 3))
    except Exception as err:  # Keras raises bare Exception/ValueError for download and shape problems
        raise UserError(_weights_problem(params, err)) from None
    base.trainable = False
    return base


def _weights_problem(params: ModelParams, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if params.weights == "imagenet":
        return (
            f"model.weights=imagenet: could not download the ImageNet weights for {params.backbone} "
            f"({first_line[:160]}); offline? set model.weights to a local weights file or to none"
        )
    return f"model.weights: {params.weights} does not fit {params.backbone} without its top ({first_line[:200]})"


def feature_extractor(params: ModelParams) -> keras.Model:
    """Pixels (0..255) at the input size -> pooled backbone features (what the head trains on)."""
    size = params.input_size
    inputs = keras.Input(shape=(size, size, 3), name="pixels")
    x = preprocessing(params.spec)(inputs)
    x = backbone(params)(x, training=False)  # training=False keeps BatchNorm in inference mode
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, outputs, name=f"{params.backbone}_features")


def head(train_features: np.ndarray, n_classes: int, dropout: float) -> keras.Model:
    """Standardize -> dropout -> softmax, over pooled features.

    Standardizing with the training features' mean and variance (fixed, not trained) keeps the
    head's learning rate meaningful whatever the backbone's output scale: random-init backbones
    (``model.weights: none``) emit features around 1e-4, ImageNet ones around 1.
    """
    inputs = keras.Input(shape=(train_features.shape[1],), name="features")
    standardize = keras.layers.Normalization(name="standardize")
    standardize.adapt(train_features)
    x = standardize(inputs)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="head")


def classifier(extractor: keras.Model, head_model: keras.Model, size: int) -> keras.Model:
    """The exported model: raw uint8 images of any size -> class probabilities."""
    inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    x = keras.layers.Resizing(size, size, crop_to_aspect_ratio=True, name="resize")(inputs)
    return keras.Model(inputs, head_model(extractor(x)), name="classifier")


def load(path: Path) -> keras.Model:
    return keras.saving.load_model(path, safe_mode=True)
