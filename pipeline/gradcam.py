"""Grad-CAM (Selvaraju et al., 2017): where in the image the backbone's last feature map made the
model choose a class. Works on the exported model: raw uint8 images in, probabilities out."""

import keras
import numpy as np
import tensorflow as tf


def _is_chain(model: keras.Model) -> bool:
    return all(not isinstance(layer.input, (list, tuple)) for layer in model.layers[1:])


def _layers_in_call_order(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers, with chain-shaped sub-models (our extractor and head) opened up.

    The backbone itself branches (Inception modules, residual adds) and stays one layer.
    """
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model) and _is_chain(layer):
            layers += _layers_in_call_order(layer)
        else:
            layers.append(layer)
    return layers


def heatmaps(model: keras.Model, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """One map per image, values 0..1, at the resolution of the backbone's last feature map."""
    layers = _layers_in_call_order(model)
    last_map = max(i for i, layer in enumerate(layers) if len(layer.output.shape) == 4)
    x = tf.cast(images, "float32")
    for layer in layers[: last_map + 1]:
        x = layer(x, training=False)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = x
        for layer in layers[last_map + 1 :]:
            y = layer(y, training=False)
        scores = tf.gather(y, classes, batch_dims=1)
    gradients = tape.gradient(scores, x)
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(channel_weights * x, axis=-1)).numpy()
    peaks = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peaks, out=np.zeros_like(cams), where=peaks > 0)
