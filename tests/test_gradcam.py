"""Grad-CAM from the one pass evaluate makes: the probabilities are the model's, the feature maps the
backbone's, and the heatmaps those of a gradient taken through the whole model from the images."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import HeadParams, ModelParams
from pipeline.model import networks
from pipeline.report import gradcam

SIZE = 96  # MobileNet's last feature map is 3x3 here: heatmaps with a shape to compare


@pytest.fixture(scope="module")
def model() -> keras.Model:
    """The exported model's shape (uint8 images -> resize -> extractor -> head), MobileNet 0.25 with
    random weights and a head with a hidden layer, so the gradient is not a constant."""
    keras.utils.set_random_seed(0)
    params = ModelParams(
        backbone="mobilenet",
        weights="none",
        image_size=SIZE,
        alpha=0.25,
        precision="float32",
        head=HeadParams(dense_units=8, dropout=0.1),
    )
    extractor = networks.feature_extractor(params)
    features = np.random.default_rng(0).normal(size=(16, extractor.output_shape[-1]))
    return networks.classifier(extractor, networks.head(networks.standardization(features), 3, params.head), SIZE)


def parts(model: keras.Model):
    extractor = next(layer for layer in model.layers if layer.name.endswith("_features"))
    return (
        model.get_layer("resize"),
        extractor.get_layer("preprocess"),
        networks.backbone_of(extractor),
        extractor.get_layer("pool"),
        model.get_layer("head"),
    )


def test_one_pass_gives_the_models_probabilities_and_the_backbones_maps(model):
    images = np.random.default_rng(0).integers(0, 256, (7, 40, 52, 3), dtype="uint8")
    keep = np.array([5, 0, 6])  # in any order, across batches
    probabilities, maps = gradcam.predict_with_maps(model, [images[:3], images[3:6], images[6:]], keep)

    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), atol=1e-6)
    resize, preprocess, backbone, _, _ = parts(model)
    expected_maps = backbone(preprocess(resize(images[keep])), training=False).numpy()
    assert maps.shape == expected_maps.shape == (3, 3, 3, 256)
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-5)


def test_heatmaps_are_grad_cam_through_the_whole_model(model):
    images = np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 3), dtype="uint8")
    classes = np.array([0, 2, 1, 2])
    _, maps = gradcam.predict_with_maps(model, [images], np.arange(4))
    cams = gradcam.heatmaps(model, maps, classes)

    resize, preprocess, backbone, pool, head = parts(model)
    with tf.GradientTape() as tape:
        feature_map = backbone(preprocess(resize(images)), training=False)
        tape.watch(feature_map)
        scores = tf.gather(head(pool(feature_map), training=False), classes, batch_dims=1)
    weights = tf.reduce_mean(tape.gradient(scores, feature_map), axis=(1, 2), keepdims=True)
    expected = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1)).numpy()
    peaks = expected.max(axis=(1, 2), keepdims=True)
    expected = np.divide(expected, peaks, out=np.zeros_like(expected), where=peaks > 0)
    assert cams.shape == (4, 3, 3)
    np.testing.assert_allclose(cams, expected, atol=1e-5)
    assert ((0 <= cams) & (cams <= 1)).all() and (cams.max(axis=(1, 2)) == 1).all()
    assert len(np.unique(cams.round(4))) > 4  # maps with a shape, not all 0 or 1


def test_the_saved_layers_after_the_backbone_score_and_explain_as_the_whole_model(model, tmp_path):
    """Evaluate, without fine-tuning, loads only networks.after_backbone's file: from the backbone's
    maps it gives the whole model's probabilities (its head on pooled maps) and Grad-CAM heatmaps."""
    images = np.random.default_rng(2).integers(0, 256, (4, SIZE, SIZE, 3), dtype="uint8")
    classes = np.array([1, 0, 2, 2])
    probabilities, maps = gradcam.predict_with_maps(model, [images], np.arange(4))
    model.save(tmp_path / "model.keras")
    _, _, backbone, _, _ = parts(model)
    backbone.save_weights(tmp_path / "backbone.weights.h5")  # the features store's copy of the backbone
    files = (tmp_path / "model.keras", tmp_path / "backbone.weights.h5")
    networks.after_backbone(model, networks.after_backbone_lineage(*files)).save(tmp_path / "after_backbone.keras")
    after = networks.load_after_backbone(tmp_path / "after_backbone.keras", networks.after_backbone_lineage(*files))
    assert after is not None

    pooled = maps.mean(axis=(1, 2))  # the features stage stores the pooled maps
    np.testing.assert_allclose(networks.head_of(after).predict(pooled, verbose=0), probabilities, atol=1e-5)
    np.testing.assert_allclose(after.predict(maps, verbose=0), probabilities, atol=1e-5)
    np.testing.assert_allclose(
        gradcam.heatmaps(after, maps, classes), gradcam.heatmaps(model, maps, classes), atol=1e-5
    )
    # Not used beside another model.keras (one replaced by hand) or another backbone (features rerun).
    for changed in files:
        kept = changed.read_bytes()
        changed.write_bytes(kept + b"\0")
        lineage = networks.after_backbone_lineage(*files)
        assert networks.load_after_backbone(tmp_path / "after_backbone.keras", lineage) is None
        changed.write_bytes(kept)
    assert networks.load_after_backbone(tmp_path / "missing.keras", networks.after_backbone_lineage(*files)) is None
