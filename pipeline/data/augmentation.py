"""The one augmentation policy (``augment`` in params.yaml), built two ways from the same config.

- offline: an albumentations ``Compose`` (:func:`offline_policy`) that the augment stage applies to
  the whole prepared images, each variant seeded from (seed, image, copy) (:func:`offline_variant`);
  the unaugmented copy 0 is not made here but by pipeline/data/images.py ``model_input``, as served;
- online: Keras preprocessing layers (:func:`online_augmentation`) for the training graph; they
  change images only when called with ``training=True`` and are not part of the exported model.

Both apply, in this order: random resized crop, flips, brightness, contrast / saturation / hue,
AlexNet PCA lighting, with the meaning of each field in pipeline/config.py (docs/params.md, docs/augmentation.md).
Core library transforms and layers are used wherever one exists; Keras 3 has no random resized
crop, no flip with a probability and no PCA lighting, and albumentations' ``FancyPCA`` is a
per-image PCA (not AlexNet's), so those few are small classes here.

Online only (``augment.online``, core Keras 3 layers that used to be keras-cv's): RandAugment, last
in the online layers, and MixUp or CutMix, which mix labels too and so run on the training batches
(:func:`label_mixing`, a map over train's tf.data batches), not in the model.
"""

import hashlib
import itertools
import math
import random
from collections.abc import Callable
from functools import cache

import albucore
import albumentations as A
import keras
import numpy as np
import tensorflow as tf
from albumentations.core.transforms_interface import BaseTransformInitSchema
from keras import ops

from pipeline.config import AugmentParams, Config
from pipeline.model.networks import dtype_policy

# Principal components of ImageNet's RGB pixel covariance (pixels in 0..1), as used by AlexNet-style
# lighting in fb.resnet.torch: eigenvalues, and eigenvectors as columns.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype="float32")
IMAGENET_EIGVEC = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]], dtype="float32"
)


def pca_lighting_shift(alpha: np.ndarray) -> np.ndarray:
    """The RGB offset (0..1 scale) for principal-component weights ``alpha``: eigvec @ (alpha * eigval)."""
    return (alpha * IMAGENET_EIGVAL) @ IMAGENET_EIGVEC.T


def variant_seed(seed: int, sha256: str, copy: int) -> int:
    """The random seed of one offline variant: independent of image order and worker count."""
    return int(hashlib.sha256(f"{seed}:{sha256}:{copy}".encode()).hexdigest()[:8], 16)


# ---- offline: albumentations ------------------------------------------------------------------


class PCALighting(A.ImageOnlyTransform):
    """AlexNet's lighting noise: add ``eigvec @ (alpha * eigval)`` to every pixel, alpha ~ N(0, std)."""

    class InitSchema(BaseTransformInitSchema):
        std: float

    def __init__(self, std: float, p: float = 1.0):
        super().__init__(p=p)
        self.std = std

    def get_params(self) -> dict[str, np.ndarray]:
        return {"alpha": self.random_generator.normal(0.0, self.std, 3).astype("float32")}

    def apply(self, img: np.ndarray, alpha: np.ndarray, **params) -> np.ndarray:
        return albucore.add(img, np.rint(255 * pca_lighting_shift(alpha)))  # saturating, per-channel lookup table

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("std",)


@cache
def offline_policy(size: int, policy: AugmentParams) -> A.Compose:
    """The random policy as albumentations transforms; seed it per variant with :func:`offline_variant`."""
    transforms = [
        # INTER_AREA where the crop shrinks: antialiased, as the unaugmented copy 0 (images.model_input) is
        A.RandomResizedCrop(
            size=(size, size), scale=policy.crop_scale, ratio=policy.crop_ratio, area_for_downscale="image"
        ),
        A.HorizontalFlip(p=policy.hflip),
        A.VerticalFlip(p=policy.vflip),
        # brightness_by_max: an additive shift of brightness * 255, like keras.layers.RandomBrightness
        A.RandomBrightnessContrast(brightness_limit=policy.brightness, contrast_limit=0, brightness_by_max=True, p=1),
        A.ColorJitter(brightness=(1, 1), contrast=policy.contrast, saturation=policy.saturation, hue=policy.hue, p=1),
        PCALighting(std=policy.pca_std),
    ]
    return A.Compose(transforms)


def offline_variant(transform: A.Compose, pixels: np.ndarray, seed: int) -> np.ndarray:
    """Apply ``transform`` with randomness drawn from ``seed`` only.

    One generator shared by all transforms: ``Compose.set_random_seed`` would give each transform
    its own generator with the same seed, so their draws would be correlated (e.g. the crop area
    with the brightness shift).
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform(image=pixels)["image"]


# ---- online: Keras layers (batches of float images, channels last) -----------------------------


class _RandomLayer(keras.layers.Layer):
    """Base of the custom layers: a seeded generator, identity at inference, shape unchanged."""

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        return self.augment(images) if training else images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="pipeline")
class RandomResizedCrop(_RandomLayer):
    """Crop a random part of the image and resize it back (what Inception and torchvision train with).

    Like albumentations' ``RandomResizedCrop``: up to 10 draws of an area fraction (uniform in
    ``scale``) and an aspect ratio (log-uniform in ``ratio``); the first that fits is used, else
    the whole image. Rejecting the misfits lowers the mean area, so keep it for the two to agree.
    """

    TRIES = 10

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float], **kwargs):
        super().__init__(**kwargs)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.supports_jit = False  # affine_transform has no XLA kernel (the same in keras.layers.RandomZoom)

    def augment(self, images):
        batch = ops.shape(images)[0]
        height, width = (ops.cast(ops.shape(images)[axis], "float32") for axis in (1, 2))
        tries = (batch, self.TRIES)
        area = keras.random.uniform(tries, *self.scale, seed=self.generator)
        ratio = ops.exp(
            keras.random.uniform(tries, math.log(self.ratio[0]), math.log(self.ratio[1]), seed=self.generator)
        )
        crop_w, crop_h = ops.sqrt(area * ratio), ops.sqrt(area / ratio)  # fractions of the sides
        fits = ops.logical_and(crop_w <= 1, crop_h <= 1)
        first = ops.expand_dims(ops.argmax(ops.cast(fits, "int32"), axis=1), 1)
        found = ops.any(fits, axis=1)
        crop_w = ops.where(found, ops.take_along_axis(crop_w, first, axis=1)[:, 0], 1.0)
        crop_h = ops.where(found, ops.take_along_axis(crop_h, first, axis=1)[:, 0], 1.0)
        left = keras.random.uniform((batch,), seed=self.generator) * (1 - crop_w) * width
        top = keras.random.uniform((batch,), seed=self.generator) * (1 - crop_h) * height
        zero = ops.zeros_like(crop_w)
        # Maps each output pixel centre to its input position (affine_transform's inverse mapping).
        transform = ops.stack(
            [crop_w, zero, left + (crop_w - 1) / 2, zero, crop_h, top + (crop_h - 1) / 2, zero, zero], axis=1
        )
        return ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="nearest")

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "ratio": self.ratio}


@keras.saving.register_keras_serializable(package="pipeline")
class RandomFlipWithProbability(_RandomLayer):
    """Flip each image with ``probability`` (keras.layers.RandomFlip always uses 0.5)."""

    def __init__(self, direction: str, probability: float, **kwargs):
        super().__init__(**kwargs)
        self.direction, self.probability = direction, probability

    def augment(self, images):
        flip = keras.random.uniform((ops.shape(images)[0], 1, 1, 1), seed=self.generator) < self.probability
        return ops.where(flip, ops.flip(images, axis=2 if self.direction == "horizontal" else 1), images)

    def get_config(self):
        return {**super().get_config(), "direction": self.direction, "probability": self.probability}


@keras.saving.register_keras_serializable(package="pipeline")
class RandomPCALighting(_RandomLayer):
    """AlexNet's lighting noise on images in 0..1 (same formula as the offline :class:`PCALighting`)."""

    def __init__(self, std: float, **kwargs):
        super().__init__(**kwargs)
        self.std = std

    def augment(self, images):
        alpha = keras.random.normal((ops.shape(images)[0], 3), stddev=self.std, seed=self.generator)
        shift = ops.matmul(alpha * IMAGENET_EIGVAL, IMAGENET_EIGVEC.T)
        return ops.clip(images + shift[:, None, None, :], 0.0, 1.0)

    def get_config(self):
        return {**super().get_config(), "std": self.std}


def online_augmentation(cfg: Config, size: int | None = None) -> keras.Sequential:
    """The policy as Keras layers: float pixels 0..255 at the input size (or ``size``) in, same shape
    and range out.

    Call it on batches inside the training graph (or a tf.data map); it augments only when
    ``training=True``, so keep it out of the model you export. Layers whose field is 0 are left out.
    """
    # float32 whatever model.precision says: 16-bit pixel arithmetic is coarse, and the layers mix
    # in float32 constants. The backbone after them casts to its own compute dtype.
    with dtype_policy("float32"):
        return _layers(cfg, size or cfg.model.input_size)


def _layers(cfg: Config, size: int) -> keras.Sequential:
    policy = cfg.augment
    seeds = itertools.count(cfg.seed * 1000)  # one seed per layer: layers sharing a seed draw the same numbers
    unit = {"value_range": (0, 1)}
    layers = [
        keras.Input(shape=(size, size, 3), name="pixels"),
        RandomResizedCrop(policy.crop_scale, policy.crop_ratio, seed=next(seeds), name="random_resized_crop"),
    ]
    if policy.hflip:
        layers.append(RandomFlipWithProbability("horizontal", policy.hflip, seed=next(seeds), name="hflip"))
    if policy.vflip:
        layers.append(RandomFlipWithProbability("vertical", policy.vflip, seed=next(seeds), name="vflip"))
    # The colour layers work in 0..1: keras.layers.RandomSaturation clips saturation to value_range,
    # so with (0, 255) a saturation boost would give negative pixels.
    layers.append(keras.layers.Rescaling(1 / 255, name="to_unit_range"))
    if policy.brightness:
        layers.append(keras.layers.RandomBrightness(policy.brightness, **unit, seed=next(seeds), name="brightness"))
    if policy.contrast:
        # As a pair: a single float c becomes [1, 1 + c] in Keras 3.15, not the documented [1 - c, 1 + c].
        contrast = (policy.contrast, policy.contrast)
        layers.append(keras.layers.RandomContrast(contrast, **unit, seed=next(seeds), name="contrast"))
    if policy.saturation:
        s = policy.saturation  # RandomSaturation multiplies by f / (1 - f): these f bounds give [1 - s, 1 + s]
        factor = ((1 - s) / (2 - s), (1 + s) / (2 + s))
        layers.append(keras.layers.RandomSaturation(factor, **unit, seed=next(seeds), name="saturation"))
    if policy.hue:
        # RandomHue turns the hue by a random sign times factor / 2 of the wheel: this gives [-hue, hue].
        layers.append(keras.layers.RandomHue((0.0, 2 * policy.hue), **unit, seed=next(seeds), name="hue"))
    if policy.pca_std:
        layers.append(RandomPCALighting(policy.pca_std, seed=next(seeds), name="pca_lighting"))
    layers.append(keras.layers.Rescaling(255, name="to_pixel_range"))
    if policy.online.rand_augment_ops:
        layers.append(
            keras.layers.RandAugment(
                value_range=(0, 255),
                num_ops=policy.online.rand_augment_ops,
                factor=policy.online.rand_augment_factor,
                seed=next(seeds),
                name="rand_augment",
            )
        )
    return keras.Sequential(layers, name="augmentation")


# ---- online label mixing: MixUp / CutMix on batches of (images, one-hot labels) ---------------

Batches = Callable[[tf.data.Dataset, int], tf.data.Dataset]  # (row indices, batch size) -> batches


def mixing_layer(cfg: Config) -> keras.layers.Layer | None:
    """``augment.online.mix`` as its Keras layer, the share of the first image ~ Beta(mix_alpha,
    mix_alpha) for both (CutMix draws its alpha uniformly in ``factor``: a pair pins it); None when off."""
    online = cfg.augment.online
    with dtype_policy("float32"):
        if online.mix == "mixup":
            return keras.layers.MixUp(alpha=online.mix_alpha, seed=cfg.seed, name="mixup")
        if online.mix == "cutmix":
            return keras.layers.CutMix(factor=(online.mix_alpha, online.mix_alpha), seed=cfg.seed, name="cutmix")
    return None


def mixed(layer: keras.layers.Layer, images, labels, seed: int, key) -> tuple:
    """``layer`` on one batch, its draws seeded by (``seed``, ``key``) alone, not by what ran before."""
    state = layer.generator.state
    state.assign(ops.stack([ops.cast(seed, state.dtype), ops.cast(key, state.dtype)]))
    out = layer({"images": images, "labels": labels}, training=True)
    return out["images"], out["labels"]


def label_mixing(cfg: Config, batches: Batches) -> Batches:
    """``batches`` with ``augment.online.mix`` applied to each batch of (float pixels, one-hot
    labels); ``batches`` itself when it is none.

    Each batch is seeded by (seed, a fingerprint of its row indices): the same epoch order gives the
    same mixing, so a resumed run mixes as an uninterrupted one did. The map runs sequentially, as
    it sets the layer's generator state.
    """
    layer = mixing_layer(cfg)
    if layer is None:
        return batches

    def key(indices):
        return tf.bitcast(tf.fingerprint(indices[None])[0], tf.int64)

    def mixed_batches(indices: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
        keyed = tf.data.Dataset.zip(batches(indices, batch_size), indices.batch(batch_size).map(key))
        return keyed.map(lambda batch, k: mixed(layer, *batch, cfg.seed, k))  # type: ignore[call-arg]  # (images, labels)

    return mixed_batches


def online_variants(cfg: Config, images: np.ndarray, size: int) -> np.ndarray:
    """What online training makes of a batch of float pixels at ``size`` px: the online layers, then
    ``augment.online.mix`` across the batch (each image its own label). For the gallery."""
    augmented = online_augmentation(cfg, size)(images, training=True)
    layer = mixing_layer(cfg)
    if layer is not None:
        augmented, _ = mixed(layer, augmented, np.eye(len(images), dtype="float32"), cfg.seed, 0)
    return np.asarray(augmented)
