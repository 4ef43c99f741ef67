"""params.yaml validation: every mistake is one line naming the key, before any work starts."""

import sys

import pytest

from conftest import run, set_params
from pipeline.cli import UserError
from pipeline.config import load_config


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.epochz", 3, "unknown key 'train.epochz' (allowed here: epochs, batch_size, learning_rate, lr_schedule"),
        ("train.epochs", "ten", "train.epochs: Input should be a valid integer (got 'ten')"),
        ("train.learning_rate", -0.1, "train.learning_rate: Input should be greater than 0 (got -0.1)"),
        ("prepare.split.val", 0.9, "prepare.split: val + test must be below 1"),
        ("model.backbone", "vgg99", "model.backbone: Input should be 'inception_v3', 'resnet50'"),
        ("model.image_size", 60, "image_size 60 is below inception_v3's minimum of 75"),
        ("model.weights", "missing.weights.h5", "no weights file at 'missing.weights.h5'"),
        ("augment.crop_scale", [0.9, 0.5], "crop_scale must be [min, max] with min <= max"),
        ("data.sha256", "abc", "data.sha256: String should match pattern"),
        ("model.precision", "bfloat16", "model.precision: Input should be 'auto', 'float32', 'mixed_float16'"),
    ],
)
def test_bad_params_fail_naming_the_key(tmp_path, key, value, expected):
    params = tmp_path / "params.yaml"
    params.write_bytes(open("params.yaml", "rb").read())
    set_params(tmp_path, **{key: value})
    with pytest.raises(UserError) as err:
        load_config(params)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_defaults_resolve_native_size():
    cfg = load_config()
    assert cfg.model.weights == "imagenet"
    assert cfg.model.input_size == 299
    assert cfg.flat()["train.learning_rate"] == cfg.train.learning_rate


@pytest.mark.parametrize(("overrides", "cut"), [
    ({}, None),  # no fine-tuning
    ({"train.fine_tune.blocks": 2}, "mixed8"),
    ({"train.fine_tune.blocks": 1, "model.backbone": "resnet50"}, "conv5_block2_out"),
    ({"train.fine_tune.blocks": 2, "augment.mode": "both"}, None),  # online layers change the inputs every epoch
    ({"train.fine_tune.blocks": 2, "augment.mode": "online"}, None),
    ({"train.fine_tune.blocks": 2, "train.fine_tune.cache_activations": False}, None),
    ({"train.fine_tune.layers": 20}, None),  # no clean cut between layers
    ({"train.fine_tune.blocks": 11}, None),  # every block: nothing frozen to cache
])
def test_activations_are_cached_only_where_fine_tuning_has_a_fixed_frozen_prefix(tmp_path, overrides, cut):
    (tmp_path / "params.yaml").write_bytes(open("params.yaml", "rb").read())
    set_params(tmp_path, **overrides)
    assert load_config(tmp_path / "params.yaml").activation_cut == cut


def test_stage_reports_bad_params_in_one_line(project):
    set_params(project, **{"train.learning_rate": -1})
    result = run([sys.executable, "-m", "pipeline.download"], project, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: train.learning_rate: Input should be greater than 0 (got -1)"
    ]
    assert not (project / "data" / "raw").exists()


def test_image_size_below_resnet_minimum_is_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(open("params.yaml", "rb").read())
    set_params(tmp_path, **{"model.backbone": "resnet50", "model.image_size": 31})
    with pytest.raises(UserError, match="image_size 31 is below resnet50's minimum of 32"):
        load_config(params)
    set_params(tmp_path, **{"model.image_size": 32})
    assert load_config(params).model.input_size == 32
