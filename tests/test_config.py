"""params.yaml validation: every mistake is one line naming the key, before any work starts."""

import re
import sys
from pathlib import Path

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
        ("train.fine_tune.blocks", 12, "params.yaml: train.fine_tune.blocks=12, but inception_v3 has 11 blocks"),
        ("augment.mode", "online", "params.yaml: augment.mode=online: the online layers run only while fine-tuning"),
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


@pytest.mark.parametrize(
    ("overrides", "cut"),
    [
        ({}, None),  # no fine-tuning
        ({"train.fine_tune.blocks": 2}, "mixed8"),
        ({"train.fine_tune.blocks": 1, "model.backbone": "resnet50"}, "conv5_block2_out"),
        ({"train.fine_tune.blocks": 2, "augment.mode": "both"}, None),  # online layers change the inputs every epoch
        ({"train.fine_tune.blocks": 2, "augment.mode": "online"}, None),
        ({"train.fine_tune.blocks": 2, "train.fine_tune.cache_activations": False}, None),
        ({"train.fine_tune.layers": 20}, None),  # no clean cut between layers
        ({"train.fine_tune.blocks": 11}, None),  # every block: nothing frozen to cache
    ],
)
def test_activations_are_cached_only_where_fine_tuning_has_a_fixed_frozen_prefix(tmp_path, overrides, cut):
    (tmp_path / "params.yaml").write_bytes(open("params.yaml", "rb").read())
    set_params(tmp_path, **overrides)
    assert load_config(tmp_path / "params.yaml").activation_cut == cut


def test_stage_reports_bad_params_in_one_line(project):
    set_params(project, **{"train.learning_rate": -1})
    result = run([sys.executable, "-m", "pipeline.stages.download"], project, check=False)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(
        r"error: params\.yaml:\d+: train\.learning_rate: Input should be greater than 0 \(got -1\)", line
    )
    assert not (project / "data" / "raw").exists()


def test_image_size_below_resnet_minimum_is_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(open("params.yaml", "rb").read())
    set_params(tmp_path, **{"model.backbone": "resnet50", "model.image_size": 31})
    with pytest.raises(UserError, match="image_size 31 is below resnet50's minimum of 32"):
        load_config(params)
    set_params(tmp_path, **{"model.image_size": 32})
    assert load_config(params).model.input_size == 32


@pytest.mark.parametrize(
    ("url", "dataset"),
    [
        ("https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz", "flower_photos"),
        ("https://host/x/pets.tar.gz?sig=abc", "pets"),
        ("file:///data/My%20Photos.ZIP", "My-Photos"),
        ("/data/cats_vs_dogs/train", "cats_vs_dogs"),  # a split folder names its dataset by its parent
        ("/data/birds/", "birds"),
    ],
)
def test_mlflow_names_follow_the_dataset_and_its_source(tmp_path, url, dataset):
    params = tmp_path / "params.yaml"
    params.write_bytes(open("params.yaml", "rb").read())
    set_params(tmp_path, **{"data.url": url})
    cfg = load_config(params)
    assert re.fullmatch(rf"{re.escape(dataset)}-[0-9a-f]{{6}}", cfg.experiment_name)
    assert cfg.registered_model_name == f"{cfg.experiment_name}-classifier"


def names_for(tmp_path: Path, url: str) -> tuple[str, str | None]:
    params = tmp_path / "params.yaml"
    params.write_bytes(open("params.yaml", "rb").read())
    set_params(tmp_path, **{"data.url": url})
    cfg = load_config(params)
    return cfg.experiment_name, cfg.registered_model_name


def test_two_sources_whose_folders_share_a_name_get_their_own_experiment_and_model(tmp_path):
    one, other = names_for(tmp_path, "/data/a/photos"), names_for(tmp_path, "/data/b/photos")
    assert one[0].startswith("photos-") and other[0].startswith("photos-")
    assert one[0] != other[0] and one[1] != other[1]
    # A URL signed anew (query values) or with other credentials is the same source.
    assert names_for(tmp_path, "https://u:p@host/f.tgz?sig=1") == names_for(tmp_path, "https://v:q@host/f.tgz?sig=2")


def test_runs_outside_dvc_experiments_are_named_by_dataset_and_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(open("params.yaml", "rb").read())
    before = load_config(params).run_name
    assert re.fullmatch(r"flower_photos-params-[0-9a-f]{6}", before)
    set_params(tmp_path, **{"evaluate.top_k": 3, "mlflow.champion_metric": "log_loss"})  # nothing the model depends on
    assert load_config(params).run_name == before
    set_params(tmp_path, **{"train.learning_rate": 0.01})
    assert load_config(params).run_name != before


def test_mlflow_names_set_in_params_win(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(open("params.yaml", "rb").read())
    set_params(tmp_path, **{"mlflow.experiment_name": "mine", "mlflow.registered_model_name": "my-model"})
    assert (load_config(params).experiment_name, load_config(params).registered_model_name) == ("mine", "my-model")
    set_params(tmp_path, **{"mlflow.register_model": False})
    assert load_config(params).registered_model_name is None


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["download", "prepare", "train"])
def test_stage_help_says_what_it_reads_and_writes_without_running(project, stage):
    shown = run([sys.executable, "-m", f"pipeline.stages.{stage}", "--help"], project)
    assert f", {stage}:" in shown.stdout.splitlines()[0]  # "Stage 2, prepare: decode every image once, ..."
    assert "data/" in shown.stdout
    assert not (project / "data").exists() and not (project / "reports").exists()
    refused = run([sys.executable, "-m", f"pipeline.stages.{stage}", "--epochs", "3"], project, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: the stage takes no arguments (got --epochs 3)")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # a "billion laughs" file: nine levels of aliases would expand to 9**9 values
        (
            lambda text: (
                "a: &a [x,x,x,x,x,x,x,x,x]\n"
                + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
                + text
            ),
            "params.yaml:2: not valid YAML: aliases (*name) are not allowed",
        ),
        (
            lambda text: text.replace("  epochs: 10 ", "  epochs: [10 ", 1),
            "not valid YAML: expected ',' or ']', but got '<scalar>' (while parsing a flow sequence on line ",
        ),
        (lambda text: text.replace("seed: 42", "seed: 4294967296"), "seed: Input should be less than 4294967296"),
        (lambda text: text.replace("seed: 42", "seed: '" + "x" * 5000 + "'"), "(got 'xxxxxxxx"),
    ],
)
def test_bad_yaml_is_refused_in_one_bounded_line_with_its_line_number(tmp_path, edit, expected):
    params = tmp_path / "params.yaml"
    params.write_text(edit(open("params.yaml", encoding="utf-8").read()), encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_config(params)
    assert expected in str(err.value)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_validation_errors_point_at_the_line_of_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(open("params.yaml", "rb").read())
    set_params(tmp_path, **{"train.learning_rate": -1})
    line = next(i for i, text in enumerate(params.read_text().splitlines(), 1) if "learning_rate: -1" in text)
    with pytest.raises(UserError, match=rf"^{re.escape(str(params))}:{line}: train.learning_rate: Input should be"):
        load_config(params)
