"""Backbones and the exported model."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run, set_params
from pipeline import models
from pipeline.backbones import BACKBONES
from pipeline.config import ModelParams


def params(backbone: str, size: int, weights: str = "none") -> ModelParams:
    return ModelParams(backbone=backbone, weights=weights, image_size=size, dropout=0.1)


def test_caffe_preprocessing_matches_keras():
    import keras

    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = models.preprocessing(BACKBONES["resnet50"])(pixels)
    expected = keras.applications.resnet50.preprocess_input(pixels.copy())
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)


def test_tf_preprocessing_matches_keras():
    import keras

    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = models.preprocessing(BACKBONES["inception_v3"])(pixels)
    expected = keras.applications.inception_v3.preprocess_input(pixels.copy())
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def test_classifier_takes_raw_uint8_of_any_size(tmp_path):
    extractor = models.feature_extractor(params("resnet50", 32))
    train_features = np.random.default_rng(0).normal(size=(10, extractor.output_shape[-1])).astype("float32")
    model = models.classifier(extractor, models.head(train_features, 4, 0.1), 32)
    model.save(tmp_path / "m.keras")
    loaded = models.load(tmp_path / "m.keras")
    for shape in [(2, 32, 32, 3), (1, 57, 91, 3)]:
        probabilities = loaded.predict(np.zeros(shape, dtype="uint8"), verbose=0)
        assert probabilities.shape == (shape[0], 4)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_weights_file_is_loaded_and_checked(tmp_path):
    base = models.backbone(params("resnet50", 32))
    base.save_weights(tmp_path / "resnet50.weights.h5")
    loaded = models.backbone(params("resnet50", 32, str(tmp_path / "resnet50.weights.h5")))
    for ours, saved in zip(loaded.get_weights(), base.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, saved)
    from pipeline.cli import UserError

    with pytest.raises(UserError, match="does not fit inception_v3"):
        models.backbone(params("inception_v3", 75, str(tmp_path / "resnet50.weights.h5")))


def test_imagenet_download_failure_is_one_line(project, tmp_path):
    set_params(project, **{"model.weights": "imagenet"})
    run([sys.executable, "-m", "pipeline.download"], project)
    run([sys.executable, "-m", "pipeline.prepare"], project)
    run([sys.executable, "-m", "pipeline.augment"], project)
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras-home"),  # nothing cached
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # no network
    result = subprocess.run([sys.executable, "-m", "pipeline.features"], cwd=project, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.weights=imagenet: could not download the ImageNet weights for inception_v3")
    assert last.endswith("offline? set model.weights to a local weights file or to none")
    assert "Traceback" not in result.stderr
    assert not (project / "data" / "features").exists()
