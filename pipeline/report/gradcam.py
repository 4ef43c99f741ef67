"""Grad-CAM (Selvaraju et al., 2017): where in the image the backbone's last feature map made the
model choose a class. Works on the exported model: raw uint8 images in, probabilities out.

The backbone's forward pass is the costly part, and evaluate runs it once for every test image
anyway: ``predict_with_maps`` returns the probabilities and, for the images asked for, the last
feature map, so the heatmaps need only the small gradient through the pooling and the head.
"""

import keras
import numpy as np
import tensorflow as tf

PER_CLASS = 2
IMAGES = 24  # at most: with many classes, one image for each of the first 24 classes


def examples(y_true: np.ndarray) -> np.ndarray:
    """The test images evaluate's Grad-CAM plot shows (indices): the first PER_CLASS of each class,
    fewer per class (at least one) and fewer classes when that would exceed IMAGES."""
    classes = np.unique(y_true)
    per_class = min(PER_CLASS, max(1, IMAGES // len(classes)))
    return np.array([i for c in classes[:IMAGES] for i in np.flatnonzero(y_true == c)[:per_class]], dtype=int)


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


def _split_at_last_map(model: keras.Model) -> tuple[list[keras.layers.Layer], list[keras.layers.Layer]]:
    """The layers up to the last one with a 4-D output (the backbone), and the layers after it (all
    of them when the model takes feature maps: networks.after_backbone)."""
    layers = _layers_in_call_order(model)
    last_map = max((i for i, layer in enumerate(layers) if len(layer.output.shape) == 4), default=-1)
    return layers[: last_map + 1], layers[last_map + 1 :]


def _chain(layers: list[keras.layers.Layer], x):
    for layer in layers:
        x = layer(x, training=False)
    return x


def predict_with_maps(model: keras.Model, batches, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One pass of ``batches`` (uint8 images) through ``model``: the probabilities of every image,
    and the last feature maps of the images at the indices ``keep`` (in that order; at least one)."""
    to_map, after_map = _split_at_last_map(model)
    inputs = keras.Input(shape=model.input_shape[1:], dtype=model.input.dtype, name="image")
    feature_map = _chain(to_map, inputs)
    both = keras.Model(inputs, [feature_map, _chain(after_map, feature_map)])
    # Traced once for any batch size (predict_on_batch would trace again for a short last batch:
    # a second or more for a large backbone).
    run = tf.function(
        lambda images: both(images, training=False),
        input_signature=[tf.TensorSpec(model.input_shape, model.input.dtype)],
    )
    probabilities, maps, seen = [], {}, 0
    wanted = set(keep.tolist())
    for batch in batches:
        batch_maps, batch_probabilities = (output.numpy() for output in run(batch))
        for row in range(len(batch_probabilities)):
            if seen + row in wanted:
                maps[seen + row] = batch_maps[row]
        probabilities.append(batch_probabilities)
        seen += len(batch_probabilities)
    return np.concatenate(probabilities), np.stack([maps[i] for i in keep])


def heatmaps(model: keras.Model, feature_maps: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """One map per feature map (from ``predict_with_maps``), values 0..1, at its resolution: the
    map's channels weighted by the gradient of ``classes``' scores with respect to them."""
    _, after_map = _split_at_last_map(model)
    x = tf.constant(feature_maps, dtype="float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        scores = tf.gather(_chain(after_map, x), classes, batch_dims=1)
    gradients = tape.gradient(scores, x)
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(channel_weights * x, axis=-1)).numpy()
    peaks = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peaks, out=np.zeros_like(cams), where=peaks > 0)
