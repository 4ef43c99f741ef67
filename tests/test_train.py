"""The train stage for real: feature cache reuse through DVC, resume after a kill, fine-tuning
flags, tf.distribute on two logical CPUs, the NaN guard. ResNet50 at 32 px keeps it quick."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from conftest import make_images, new_project, project_env, run, set_params
from pipeline import models

TINY = {"model.backbone": "resnet50", "model.image_size": 32, "augment.mode": "both", "train.epochs": 2}


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def featured_template(tmp_path_factory) -> Path:
    """A project with the stages up to features done, built once per module."""
    tmp = tmp_path_factory.mktemp("train")
    project = new_project(tmp / "project", make_images(tmp / "images", {"red": 12, "green": 12, "blue": 12}))
    set_params(project, **TINY)
    run(["dvc", "repro", "features"], project)
    return project


@pytest.fixture
def featured(featured_template, tmp_path) -> Path:
    return Path(shutil.copytree(featured_template, tmp_path / "project", symlinks=True))


def history(project: Path) -> list[dict[str, str]]:
    with open(project / "data" / "model" / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def metrics_only(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def changed_stages(project: Path) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], project).stdout))


def test_feature_cache_is_reused_for_head_changes_and_rebuilt_for_augmentation_or_backbone(featured):
    set_params(featured, **{"model.head.dense_units": 16, "model.head.dropout": 0.3, "train.label_smoothing": 0.0})
    assert stages_run(run(["dvc", "repro", "train"], featured).stdout) == ["train"]
    assert [r["phase"] for r in history(featured)] == ["head", "head"]

    features_before = (featured / "data" / "features" / "train.npy").read_bytes()
    set_params(featured, **{"augment.brightness": 0.4})
    assert stages_run(run(["dvc", "repro", "features"], featured).stdout) == ["augment", "features"]
    assert (featured / "data" / "features" / "train.npy").read_bytes() != features_before

    set_params(featured, **{"model.backbone": "resnet50_v2"})
    status = json.loads(run(["dvc", "status", "--json", "features"], featured).stdout)
    assert {"changed deps": {"params.yaml": {"model.backbone": "modified"}}} in status["features"]


def start_in_own_group(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=project_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill_after_epoch(process: subprocess.Popen, state_file: Path, epoch: int, timeout: float = 600) -> int:
    """SIGKILL the process and its children once ``state_file`` records ``epoch``; the epoch it had reached."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        reached = json.loads(state_file.read_text())["epoch"] if state_file.is_file() else 0  # written atomically
        if reached >= epoch:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return reached
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of epoch {epoch} appeared:\n{process.communicate()[0]}")


def test_killed_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(featured_template, tmp_path):
    # Two head epochs (1-2), then fine-tuning the top block with online augmentation for epochs 3-6;
    # early stopping and the plateau schedule remember earlier epochs, so resuming must restore them.
    # Two copies of the project: in one copy DVC's run cache would restore the first run's output.
    fine_tune = {"train.fine_tune.blocks": 1, "train.fine_tune.epochs": 4, "train.early_stopping_patience": 2}
    uninterrupted, project = (Path(shutil.copytree(featured_template, tmp_path / name, symlinks=True))
                              for name in ("uninterrupted", "killed"))
    for copy in (uninterrupted, project):
        set_params(copy, **fine_tune)
    run(["dvc", "repro", "train"], uninterrupted)
    expected = history(uninterrupted)
    assert [r["phase"] for r in expected][:3] == ["head", "head", "fine_tune"]

    killed = start_in_own_group(["dvc", "repro", "train"], project)
    reached = kill_after_epoch(killed, project / "data" / "checkpoints" / "fine_tune" / "state.json", epoch=3)
    assert not (project / "data" / "model").exists()

    resumed = run(["dvc", "repro", "train"], project)
    assert stages_run(resumed.stdout) == ["train"]
    assert f"resuming the fine_tune phase after epoch {reached}" in resumed.stdout
    assert metrics_only(history(project)) == metrics_only(expected)
    assert not (project / "data" / "checkpoints").exists()
    val_images = sorted((project / "data" / "augmented" / "val").rglob("*.jpg"))
    images = np.stack([np.asarray(Image.open(path)) for path in val_images])
    np.testing.assert_array_equal(*(models.load(p / "data" / "model" / "model.keras").predict(images, verbose=0)
                                    for p in (uninterrupted, project)))

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["flowers"], output_format="list", order_by=["start_time"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    client = mlflow.MlflowClient()
    last = runs[-1].info.run_id
    assert [m.step for m in client.get_metric_history(last, "val_accuracy")] == [1, 2]
    fine_tune_epochs = [int(r["epoch"]) for r in expected if r["phase"] == "fine_tune"]
    assert [m.step for m in client.get_metric_history(last, "finetune_val_accuracy")] == fine_tune_epochs


def test_mirrored_strategy_trains_on_two_logical_cpus(featured):
    set_params(featured, **{"train.lr_schedule": "cosine", "train.class_weight": "none"})
    script = (
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from pipeline.cli import run_stage\n"
        "from pipeline.train import main\n"
        "run_stage(main)\n"
    )
    result = run([sys.executable, "-c", script], featured)
    assert "train: 2 replica(s)" in result.stdout
    rows = history(featured)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[1]["learning_rate"]) < float(rows[0]["learning_rate"])  # cosine decay


def test_nan_loss_stops_the_stage_naming_the_learning_rate(featured):
    set_params(featured, **{"train.learning_rate": 1e38})
    result = run([sys.executable, "-m", "pipeline.train"], featured, check=False)
    assert result.returncode == 2
    assert re.fullmatch(r"error: the training loss became nan in epoch 1 \(head phase\): "
                        r"train.learning_rate=1e\+38 is probably too high; lower it",
                        result.stderr.strip().splitlines()[-1])
    assert not (featured / "data" / "model").exists()


def test_mixed_precision_training_exports_a_float32_model(tmp_path):
    from pipeline.config import HeadParams, ModelParams
    from pipeline.train import exported

    params = ModelParams(backbone="resnet50", weights="none", image_size=32,
                         head=HeadParams(dense_units=8, dropout=0.1))
    x_train = np.random.default_rng(0).normal(size=(10, 2048)).astype("float32")
    images = np.random.default_rng(1).integers(0, 255, (2, 40, 50, 3), dtype="uint8")
    with models.dtype_policy("mixed_float16"):
        extractor, head = models.feature_extractor(params), models.head(x_train, 3, params.head)
        trained = models.classifier(extractor, head, 32)
        assert models.backbone_of(extractor).layers[2].compute_dtype == "float16"
        model = exported(params, extractor, head, x_train, 3)
    model.save(tmp_path / "model.keras")
    loaded = models.load(tmp_path / "model.keras")
    backbone = models.backbone_of(loaded.get_layer(extractor.name))
    assert {layer.compute_dtype for layer in backbone.layers[1:]} == {"float32"}
    np.testing.assert_allclose(loaded.predict(images, verbose=0), trained.predict(images, verbose=0), atol=2e-2)
