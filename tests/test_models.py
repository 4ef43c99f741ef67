"""Backbones, fine-tuning splits and the exported model."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

from conftest import run, set_params
from pipeline.cli import UserError
from pipeline.config import FineTuneParams, HeadParams, ModelParams
from pipeline.model import networks
from pipeline.model.backbones import BACKBONES

HEAD = HeadParams(dense_units=0, dropout=0.1)


def params(backbone: str, size: int, weights: str = "none", alpha: float | None = None) -> ModelParams:
    return ModelParams(backbone=backbone, weights=weights, image_size=size, alpha=alpha, precision="float32", head=HEAD)


def fine_tune(blocks: int = 0, layers: int = 0) -> FineTuneParams:
    return FineTuneParams(
        blocks=blocks, layers=layers, epochs=1, batch_size=2, learning_rate=1e-3, cache_activations=True
    )


def random_features(extractor: keras.Model, rows: int = 10) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, extractor.output_shape[-1])).astype("float32")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_cuts_cleanly_at_its_blocks(name):
    spec = BACKBONES[name]
    base = networks.backbone(params(name, max(spec.min_size, 32)))
    assert [layer.name for layer in base.layers if layer.name in spec.blocks] == list(spec.blocks)
    for cut in spec.blocks[:-1]:  # the top block ends at the output, never a cut
        networks.split_at(base, cut)  # Keras refuses a top whose layers read anything below the cut
    # Preprocessing happens exactly once: in our layer, or in the application's first layers.
    assert isinstance(base.layers[1], keras.layers.Rescaling | keras.layers.Normalization) == (
        spec.preprocessing == "included"
    )


# One backbone per family of keras.applications layers (ResNet101/152 and EfficientNetV2 B1-B3 are
# deeper stacks of the same layers). Not MobileNet v1: with random weights its activations shrink
# about twofold a block, to 1e-22 at the top, and no gradient that small moves a float32 weight.
FAMILIES = [
    "inception_v3",
    "resnet50",
    "resnet50_v2",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_v2_b0",
    "convnext_tiny",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_a_fine_tuning_step_trains_the_top_block_and_nothing_else(name):
    spec = BACKBONES[name]
    size = max(spec.min_size, 32)
    extractor = networks.feature_extractor(params(name, size))
    base = networks.backbone_of(extractor)
    networks.unfreeze_top(base, networks.trainable_top_start(base, spec, fine_tune(blocks=1)))
    head = networks.head(networks.standardization(random_features(extractor)), 3, HEAD)
    network = networks.on_pixels(extractor, head, size)
    network.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    frozen_before = [w.numpy() for w in base.non_trainable_weights]  # BatchNorm statistics included
    trainable_before = [w.numpy() for w in base.trainable_weights]
    images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    loss = network.train_on_batch(images, np.eye(3, dtype="float32")[[0, 2]])
    assert np.isfinite(loss)
    for before, after in zip(frozen_before, base.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())
    assert any(not np.array_equal(b, a.numpy()) for b, a in zip(trainable_before, base.trainable_weights, strict=True))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_preprocessing_matches_keras_preprocess_input(name):
    spec = BACKBONES[name]
    module = getattr(keras.applications, getattr(keras.applications, spec.application).__module__.split(".")[-1])
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = networks.preprocessing(spec)(pixels)
    np.testing.assert_allclose(np.asarray(ours), module.preprocess_input(pixels.copy()), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["inception_v3", "resnet50", "mobilenet_v2"])
def test_the_cached_activations_model_computes_what_the_whole_network_does(name):
    spec = BACKBONES[name]
    size = max(spec.min_size, 32)
    extractor = networks.feature_extractor(params(name, size))
    head = networks.head(networks.standardization(random_features(extractor)), 3, HEAD)
    cut = spec.blocks[-2]
    images = np.random.default_rng(1).uniform(0, 255, (4, size, size, 3)).astype("float32")
    features, activations = networks.with_activations(extractor, cut).predict_on_batch(images)
    np.testing.assert_allclose(features, extractor.predict_on_batch(images), rtol=1e-5, atol=1e-7)
    assert activations.shape[1:] == networks.backbone_of(extractor).get_layer(cut).output.shape[1:]

    # The fine-tuning model on the activations gives the whole network's output and trains only
    # the unfrozen top: the weights it changes are the backbone's own.
    base = networks.backbone_of(extractor)
    networks.unfreeze_top(base, networks.trainable_top_start(base, spec, fine_tune(blocks=1)))
    cached = networks.on_activations(extractor, head, cut)
    whole = networks.on_pixels(extractor, head, size)
    np.testing.assert_allclose(cached.predict_on_batch(activations), whole.predict_on_batch(images), rtol=1e-5)
    assert {id(w) for w in cached.trainable_weights} == {id(w) for w in whole.trainable_weights}
    cached.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    before = [w.numpy() for w in base.trainable_weights]
    cached.train_on_batch(activations, np.eye(3, dtype="float32")[[0, 1, 2, 0]])
    assert all(
        not np.array_equal(b, w.numpy())
        for b, w in zip(before, base.trainable_weights, strict=True)
        if w.path.endswith("kernel")
    )


def test_column_stats_streams_in_chunks_and_matches_numpy(tmp_path):
    rng = np.random.default_rng(3)
    rows = np.lib.format.open_memmap(tmp_path / "rows.npy", mode="w+", dtype="float16", shape=(1000, 6))
    rows[:] = 1000 + rng.normal(scale=[0.5, 1, 2, 4, 8, 16], size=(1000, 6))  # big mean, small spread
    mean, variance = networks.column_stats(np.load(tmp_path / "rows.npy", mmap_mode="r"), chunk_rows=7)
    exact = np.asarray(rows, dtype="float64")
    np.testing.assert_allclose(mean, exact.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(variance, exact.var(axis=0), rtol=1e-9)


@pytest.mark.parametrize(
    ("setting", "backbone", "gpu", "flags", "expected"),
    [
        ("float32", "inception_v3", False, {"amx_bf16"}, "float32"),
        ("mixed_bfloat16", "mobilenet_v2", False, set(), "mixed_bfloat16"),
        ("auto", "inception_v3", False, {"avx2", "amx_bf16"}, "mixed_bfloat16"),
        ("auto", "resnet50", False, {"avx512_bf16"}, "mixed_bfloat16"),
        ("auto", "inception_v3", False, {"avx2", "avx512f"}, "float32"),
        ("auto", "mobilenet_v2", False, {"avx2", "amx_bf16"}, "float32"),  # depthwise: slower in bfloat16
        ("auto", "efficientnet_v2_b0", False, {"amx_bf16"}, "mixed_bfloat16"),  # its fused blocks gain
        ("auto", "convnext_tiny", False, {"amx_bf16"}, "float32"),  # no gain: the exact one
        ("auto", "mobilenet_v2", True, {"amx_bf16"}, "mixed_float16"),
    ],
)
def test_precision_auto_picks_float16_on_gpus_bfloat16_on_cpus_where_it_is_faster(
    monkeypatch, setting, backbone, gpu, flags, expected
):
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["gpu0"] if gpu and kind == "GPU" else [])
    monkeypatch.setattr(networks, "_cpu_flags", lambda: flags)
    chosen = params(backbone, 224).model_copy(update={"precision": setting})
    assert networks.compute_policy(chosen) == expected


def test_fine_tuning_unfreezes_only_the_top_blocks_and_never_batchnorm():
    spec = BACKBONES["inception_v3"]
    base = networks.backbone(params("inception_v3", 75))
    start = networks.trainable_top_start(base, spec, fine_tune(blocks=2))
    networks.unfreeze_top(base, start)
    assert base.layers[start - 1].name == "mixed8"  # the cut: mixed9 and mixed10 train
    batchnorm = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorm and not any(layer.trainable for layer in batchnorm)
    with_weights = [(i, layer) for i, layer in enumerate(base.layers) if layer.weights and layer not in batchnorm]
    assert all(layer.trainable == (i >= start) for i, layer in with_weights)
    assert {w.path.split("/")[0] for w in base.trainable_weights} == {
        layer.name for i, layer in with_weights if i >= start
    }

    assert networks.trainable_top_start(base, spec, fine_tune(layers=10)) == len(base.layers) - 10
    assert networks.trainable_top_start(base, spec, fine_tune(blocks=11)) == 1  # every block


@pytest.mark.slow
@pytest.mark.parametrize("name", [*FAMILIES, "mobilenet"])  # each family's layers must load in safe mode
def test_classifier_takes_raw_uint8_of_any_size(tmp_path, name):
    size = max(BACKBONES[name].min_size, 32)
    extractor = networks.feature_extractor(params(name, size))
    head = networks.head(networks.standardization(random_features(extractor)), 4, HEAD)
    model = networks.classifier(extractor, head, size)
    model.save(tmp_path / "m.keras")
    loaded = networks.load(tmp_path / "m.keras")
    for shape in [(2, size, size, 3), (1, 57, 91, 3)]:
        probabilities = loaded.predict(np.zeros(shape, dtype="uint8"), verbose=0)
        assert probabilities.shape == (shape[0], 4)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_weights_file_is_loaded_and_checked(tmp_path):
    base = networks.backbone(params("resnet50", 32))
    base.save_weights(tmp_path / "resnet50.weights.h5")
    loaded = networks.backbone(params("resnet50", 32, str(tmp_path / "resnet50.weights.h5")))
    for ours, saved in zip(loaded.get_weights(), base.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, saved)
    for other, size in (("inception_v3", 75), ("resnet101", 32)):  # another shape; more blocks of the same kind
        with warnings.catch_warnings(record=True) as printed:
            warnings.simplefilter("always")
            with pytest.raises(UserError, match=f"does not fit {other} without its top"):
                networks.backbone(params(other, size, str(tmp_path / "resnet50.weights.h5")))
        assert not [w for w in printed if issubclass(w.category, UserWarning)]  # one line, no wall of warnings


def test_alpha_sets_the_width_and_only_where_the_backbone_has_one(tmp_path):
    narrow = networks.backbone(params("mobilenet", 32, alpha=0.25))
    assert narrow.get_layer("conv1").kernel.shape == (3, 3, 3, 8)  # 32 filters x 0.25
    assert networks.backbone(params("mobilenet_v2", 32)).get_layer("Conv1").kernel.shape[-1] == 32  # null = 1.0
    narrow.save_weights(tmp_path / "mobilenet_0.25.weights.h5")
    with pytest.raises(
        UserError,
        match=r"does not fit mobilenet alpha 0\.5 without its top .*; set model\.backbone "
        r"and model\.alpha to the network the file was saved from$",
    ):
        networks.backbone(params("mobilenet", 32, str(tmp_path / "mobilenet_0.25.weights.h5"), alpha=0.5))
    with pytest.raises(
        ValueError,
        match=r"alpha 0\.3 is not one of mobilenet's widths \(0\.25, 0\.5, 0\.75, 1\.0; "
        r"null = 1\.0\)",
    ):
        params("mobilenet", 32, alpha=0.3)
    with pytest.raises(ValueError, match="alpha 1.0: resnet50 has no width multiplier; set alpha to null"):
        params("resnet50", 32, alpha=1.0)


@pytest.mark.slow
def test_imagenet_download_failure_is_one_line(project, tmp_path):
    set_params(project, **{"model.weights": "imagenet"})
    run([sys.executable, "-m", "pipeline.stages.download"], project)
    run([sys.executable, "-m", "pipeline.stages.prepare"], project)
    run([sys.executable, "-m", "pipeline.stages.augment"], project)
    env = {
        **os.environ,
        "KERAS_HOME": str(tmp_path / "keras-home"),  # nothing cached
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }  # no network
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.features"],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.weights=imagenet: could not download the ImageNet weights for inception_v3")
    assert last.endswith("offline? set model.weights to a local weights file or to none")
    assert "Traceback" not in result.stderr
    assert not (project / "data" / "features").exists()


def test_folding_a_temperature_divides_the_logits_and_keeps_the_most_probable_class():
    features = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    head = networks.head(networks.standardization(features), 3, HEAD)
    before = head.predict(features, verbose=0)
    networks.fold_temperature(head, 2.0)
    after = head.predict(features, verbose=0)
    expected = np.sqrt(before) / np.sqrt(before).sum(axis=1, keepdims=True)  # softmax(logits / 2)
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    assert (after.argmax(axis=1) == before.argmax(axis=1)).all()
    assert not np.allclose(after, before)


def generated_features(n_classes: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes in 40 features of very different scales (1e-4 like a random-init
    backbone's, up to 100), and one constant feature."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(n_classes, 40))
    labels = np.arange(rows) % n_classes
    scales = np.logspace(-4, 2, 40)
    features = ((3 + centers[labels] * 0.4 + rng.normal(size=(rows, 40))) * scales).astype("float32")
    features[:, 7] = 3.0
    return features, labels


@pytest.mark.parametrize("n_classes", [2, 4])
def test_the_linear_head_is_logistic_regressions_optimum_at_the_strength_val_chose(n_classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from conftest import REPO
    from pipeline.config import load_config
    from pipeline.model import linear_head
    from pipeline.stages.train import linear_head_model

    (x_train, y_train), (x_val, y_val), (x_test, _) = (
        generated_features(n_classes, rows, seed) for rows, seed in ((60, 0), (40, 1), (200, 2))
    )
    stats = networks.standardization(x_train)
    head, solution = linear_head_model(
        load_config(REPO / "params.yaml"), stats, (x_train, y_train), (x_val, y_val), n_classes
    )

    # The reference: scikit-learn solved to a gradient 1e6 times smaller, at every strength of the
    # grid, on rows standardized in float64 (a constant feature left as it is).
    scale = np.where(x_train.std(axis=0) > 0, x_train.astype("float64").std(axis=0), 1.0)
    mean = x_train.astype("float64").mean(axis=0)
    standardized = {
        name: (x.astype("float64") - mean) / scale for name, x in (("train", x_train), ("val", x_val), ("test", x_test))
    }

    def optimum(l2: float) -> LogisticRegression:
        return LogisticRegression(
            C=1 / (2 * l2 * len(y_train)), class_weight="balanced", tol=1e-10, max_iter=100_000
        ).fit(standardized["train"], y_train)

    val_losses = [log_loss(y_val, optimum(l2).predict_proba(standardized["val"])) for l2 in linear_head.L2_GRID]
    assert solution.chosen.l2 == linear_head.L2_GRID[int(np.argmin(val_losses))]
    assert linear_head.L2_GRID[0] > solution.chosen.l2 > linear_head.L2_GRID[-1]  # an optimum inside the grid
    expected = optimum(solution.chosen.l2).predict_proba(standardized["test"])
    # L-BFGS stops at scikit-learn's default tolerance, within a few thousandths of the optimum.
    np.testing.assert_allclose(head.predict(x_test, verbose=0), expected, atol=5e-3)
