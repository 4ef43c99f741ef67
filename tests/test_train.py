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

from conftest import (
    finished,
    free_port,
    on_two_cpus,
    project_env,
    project_through,
    run,
    set_params,
    start_mlflow_server,
    start_two_workers,
)
from pipeline.config import load_config
from pipeline.model import networks
from pipeline.paths import HISTORY
from pipeline.stages.train import MLP_L2_GRID

pytestmark = pytest.mark.slow

TINY = {"model.backbone": "resnet50", "model.image_size": 32, "augment.mode": "both", "train.epochs": 2}


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def featured_template(tmp_path_factory) -> Path:
    """A project with the stages up to features done, built once per module."""
    return project_through("features", tmp_path_factory.mktemp("train"), {"red": 12, "green": 12, "blue": 12}, TINY)


@pytest.fixture
def featured(featured_template, tmp_path) -> Path:
    return Path(shutil.copytree(featured_template, tmp_path / "project", symlinks=True))


def history(project: Path) -> list[dict[str, str]]:
    with open(project / HISTORY, newline="") as fh:
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


def test_the_head_is_the_optimum_of_its_problem_whatever_the_seed(featured, tmp_path):
    """The linear head is multinomial logistic regression on standardized features, solved at the L2
    strength with the lowest val log loss: scikit-learn's answer at that strength, solved far
    tighter; and another seed on the same data gives the same head."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    other = Path(shutil.copytree(featured, tmp_path / "other", symlinks=True))
    for project, seed in ((featured, 42), (other, 7)):
        set_params(project, **{"seed": seed, "train.temperature_scaling": False})
        run([sys.executable, "-m", "pipeline.stages.train"], project)  # on the same features: no dvc repro
    features = featured / "data" / "features"
    x = {split: np.load(features / f"{split}.npy") for split in ("train", "val", "test")}
    train_labels = np.load(features / "train_labels.npy")
    rows = np.concatenate([x["val"], x["test"]])
    heads = [
        networks.load(project / "data" / "model" / "model.keras").get_layer("head") for project in (featured, other)
    ]
    probabilities = [head.predict(rows, verbose=0) for head in heads]
    np.testing.assert_allclose(*probabilities, atol=1e-4)
    assert metrics_only(history(featured)) == metrics_only(history(other))

    path = history(featured)
    assert {row["phase"] for row in path} == {"head"}
    assert [int(row["epoch"]) for row in path] == list(range(1, len(path) + 1))
    strengths = [float(row["l2"]) for row in path]
    assert strengths == sorted(strengths, reverse=True)
    kept = float(min(path, key=lambda row: float(row["val_loss"]))["l2"])
    scaler = StandardScaler().fit(x["train"])
    optimum = LogisticRegression(
        C=1 / (2 * kept * len(train_labels)), class_weight="balanced", tol=1e-10, max_iter=100_000
    ).fit(scaler.transform(x["train"]), train_labels)
    np.testing.assert_allclose(probabilities[0], optimum.predict_proba(scaler.transform(rows)), atol=5e-3)


def start_in_own_group(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=project_env(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


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
    uninterrupted, project = (
        Path(shutil.copytree(featured_template, tmp_path / name, symlinks=True)) for name in ("uninterrupted", "killed")
    )
    for copy in (uninterrupted, project):
        set_params(copy, **fine_tune)
    run(["dvc", "repro", "train"], uninterrupted)
    expected = history(uninterrupted)
    head_steps = sum(r["phase"] == "head" for r in expected)  # the linear head's L2 strengths
    assert [r["phase"] for r in expected][head_steps - 1 : head_steps + 1] == ["head", "fine_tune"]

    killed = start_in_own_group(["dvc", "repro", "train"], project)
    reached = kill_after_epoch(
        killed, project / "data" / "checkpoints" / "fine_tune" / "state.json", epoch=head_steps + 1
    )
    assert not (project / "data" / "model").exists()

    resumed = run(["dvc", "repro", "train"], project)
    assert stages_run(resumed.stdout) == ["train"]
    assert f"resuming the fine_tune phase after epoch {reached}" in resumed.stdout
    assert metrics_only(history(project)) == metrics_only(expected)
    assert not (project / "data" / "checkpoints").exists()
    val_images = sorted((project / "data" / "augmented" / "val").rglob("*.jpg"))
    images = np.stack([np.asarray(Image.open(path)) for path in val_images])
    np.testing.assert_array_equal(
        *(
            networks.load(p / "data" / "model" / "model.keras").predict(images, verbose=0)
            for p in (uninterrupted, project)
        )
    )

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=[load_config(project / "params.yaml").experiment_name],
        output_format="list",
        order_by=["start_time"],
    )
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    client = mlflow.MlflowClient()
    last = runs[-1].info.run_id
    assert [m.step for m in client.get_metric_history(last, "val_accuracy")] == list(range(1, head_steps + 1))
    fine_tune_epochs = [int(r["epoch"]) for r in expected if r["phase"] == "fine_tune"]
    assert [m.step for m in client.get_metric_history(last, "finetune_val_accuracy")] == fine_tune_epochs


def test_two_workers_train_the_model_of_one_and_a_killed_worker_stops_them_until_a_rerun_resumes(
    featured_template, tmp_path
):
    # A cluster of two processes on 127.0.0.1 (TF_CONFIG) against one process with the CPU split
    # in two: two replicas, the same global batches either way. The linear head (solved), then
    # fine-tuning the top block on the images with online augmentation. Worker 1 is killed after the
    # chief's first fine-tuning checkpoint; the chief must stop in one line, and both rerun must go on from there.
    steps = {"train.fine_tune.blocks": 1, "train.fine_tune.epochs": 3, "train.early_stopping_patience": None}
    one, chief, worker = (
        Path(shutil.copytree(featured_template, tmp_path / name, symlinks=True)) for name in ("one", "chief", "worker")
    )
    for copy in (one, chief, worker):
        set_params(copy, **steps)
    assert "train: 2 replica(s) on 1 worker(s)" in run(on_two_cpus("train"), one).stdout
    head_steps = sum(r["phase"] == "head" for r in history(one))  # the linear head's L2 strengths

    processes = start_two_workers("train", chief, worker)
    checkpoint = chief / "data" / "checkpoints" / "fine_tune" / "state.json"
    kill_after_epoch(processes[1], checkpoint, epoch=head_steps + 1)
    stopped = finished(processes[:1])[0]
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        "error: a worker of the cluster (TF_CONFIG) stopped or cannot be reached (TensorFlow's UnavailableError); "
        "start it and rerun the stage on every worker (dvc repro on the chief): training goes on from the chief's "
        "last checkpoint"
    )
    assert not (chief / "data" / "model").exists()

    resumed = finished(start_two_workers("train", chief, worker))
    for result in resumed:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "train: 2 replica(s) on 2 worker(s)" in result.stdout
        resumed_after = rf"resuming the fine_tune phase after epoch ({head_steps + 1}|{head_steps + 2}) "
        assert re.search(resumed_after, result.stdout), result.stdout
    assert "the chief wrote the model and the MLflow run" in resumed[1].stdout
    assert {p.name for p in (worker / "data").iterdir()} == {p.name for p in (featured_template / "data").iterdir()}
    assert not (worker / HISTORY).exists() and not (worker / "mlflow.db").exists()  # only the chief writes
    assert not (chief / "data" / "checkpoints").exists()

    expected, got = history(one), history(chief)
    assert [(r["phase"], r["epoch"]) for r in got] == [(r["phase"], r["epoch"]) for r in expected]
    for name in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose([float(r[name]) for r in got], [float(r[name]) for r in expected], rtol=1e-4)
    val_images = sorted((chief / "data" / "augmented" / "val").rglob("*.jpg"))
    images = np.stack([np.asarray(Image.open(path)) for path in val_images])
    np.testing.assert_allclose(
        *(networks.load(p / "data" / "model" / "model.keras").predict(images, verbose=0) for p in (chief, one)),
        atol=1e-5,
    )
    mlflow.set_tracking_uri(f"sqlite:///{chief / 'mlflow.db'}")
    experiment = load_config(chief / "params.yaml").experiment_name
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", order_by=["start_time"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]  # the chief stopped with an error


def test_cached_fine_tuning_trains_like_fine_tuning_on_the_images(featured_template, tmp_path):
    # Offline augmentation and a block cut: the features stage caches the prefix's output and
    # fine-tuning runs only the top. Without the cache the same training runs on the images.
    # bfloat16 compute: the cache holds exactly what the prefix computed, so both must agree.
    tune = {
        "augment.mode": "offline",
        "model.precision": "mixed_bfloat16",
        "train.fine_tune.blocks": 1,
        "train.fine_tune.epochs": 2,
        "train.early_stopping_patience": None,
        "train.lr_schedule": "constant",
        "train.fine_tune.learning_rate": 1e-3,
    }
    cached, plain = (
        Path(shutil.copytree(featured_template, tmp_path / name, symlinks=True)) for name in ("cached", "plain")
    )
    set_params(cached, **tune)
    set_params(plain, **tune, **{"train.fine_tune.cache_activations": False})
    output = run(["dvc", "repro", "train"], cached).stdout
    assert "fine-tuning on the activations at conv5_block2_out cached by the features stage" in output
    features = cached / "data" / "features"
    assert json.loads((features / "meta.json").read_text())["activation_dtype"] == "bfloat16"
    for split in ("train", "val"):
        activations = np.load(features / f"{split}_activations.npy", mmap_mode="r")
        assert activations.dtype == np.uint16  # bfloat16 bit patterns
        assert activations.shape == (len(np.load(features / f"{split}_labels.npy")), 1, 1, 2048)
    assert not (features / "test_activations.npy").exists()

    assert "fine-tuning on the activations" not in run(["dvc", "repro", "train"], plain).stdout
    assert not list((plain / "data" / "features").glob("*_activations.npy"))
    rows = {name: metrics_only(history(project)) for name, project in (("cached", cached), ("plain", plain))}
    assert [r["phase"] for r in history(cached) if r["phase"] != "head"] == ["fine_tune", "fine_tune"]
    for with_cache, without in zip(rows["cached"], rows["plain"], strict=True):
        for key in ("loss", "val_loss"):
            assert float(with_cache[key]) == pytest.approx(float(without[key]), rel=2e-3)
    val_images = sorted((cached / "data" / "augmented" / "val").rglob("*.jpg"))
    images = np.stack([np.asarray(Image.open(path)) for path in val_images])
    tuned = {
        name: networks.load(project / "data" / "model" / "model.keras")
        for name, project in (("cached", cached), ("plain", plain))
    }
    np.testing.assert_allclose(*(model.predict(images, verbose=0) for model in tuned.values()), atol=2e-3)
    untuned = networks.saved_feature_extractor(load_config(cached / "params.yaml").model, features)
    top = networks.backbone_of(untuned).get_layer("conv5_block3_3_conv").get_weights()[0]
    assert not np.allclose(
        top,
        networks.backbone_of(tuned["cached"].get_layer(untuned.name)).get_layer("conv5_block3_3_conv").get_weights()[0],
    )


@pytest.mark.parametrize(("policy", "rtol"), [("mixed_bfloat16", 2**-8), ("mixed_float16", 2**-11)])
def test_stored_activations_read_back_as_computed(tmp_path, policy, rtol):
    from pipeline.model.feature_store import activation_storage, as_stored
    from pipeline.stages.train import in_order, row_examples

    storage = activation_storage(policy)
    rng = np.random.default_rng(0)
    low = 1e-8 if storage == "bfloat16" else 1e-4  # bfloat16 keeps float32's range: tiny values survive
    values = (rng.choice([-1, 1], (6, 4)) * np.exp(rng.uniform(np.log(low), np.log(1e4), (6, 4)))).astype("float32")
    np.save(tmp_path / "rows.npy", as_stored(values, storage))
    examples = row_examples(
        np.load(tmp_path / "rows.npy", mmap_mode="r"), np.zeros(6, int), 2, bfloat16_bits=storage == "bfloat16"
    )
    read = np.concatenate([x.numpy() for x, _ in in_order(examples, batch_size=4)])
    np.testing.assert_allclose(read, values, rtol=rtol)


def anonymous_memory_mib() -> float:
    """RssAnon: memory only swap could free. Pages of a memory-mapped file are page cache the OS
    drops and re-reads at will, so they are no part of what a dataset larger than RAM would need."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon")) / 1024


def test_features_far_larger_than_a_memory_cap_stream_from_disk(tmp_path):
    from pipeline.stages.train import row_examples, shuffled_epochs

    cap_mib, count, dim = 100, 24_000, 8192  # a 375 MiB float16 file
    rows = np.lib.format.open_memmap(tmp_path / "train.npy", mode="w+", dtype="float16", shape=(count, dim))
    for start in range(0, count, 1000):  # row i holds its number in its first two columns (exact in float16)
        ids = np.arange(start, start + 1000)
        rows[start : start + 1000, :2] = np.stack([ids % 1024, ids // 1024], axis=1)
    rows.flush()
    del rows
    labels = np.arange(count) % 3
    examples = row_examples(np.load(tmp_path / "train.npy", mmap_mode="r"), labels, n_classes=3)
    batches = iter(shuffled_epochs(examples, batch_size=256, seed=0, epochs=range(1)))
    ids, classes = [], []

    def keep_ids(batch):  # only the ids and labels are kept: the rows themselves are let go
        x, y = batch
        ids.append((x[:, 0] + 1024 * x[:, 1]).numpy().astype(int))
        classes.append(y.numpy().argmax(axis=1))

    keep_ids(next(batches))
    baseline, peak = anonymous_memory_mib(), 0.0
    for batch in batches:
        peak = max(peak, anonymous_memory_mib())
        keep_ids(batch)
    order = np.concatenate(ids)
    np.testing.assert_array_equal(np.sort(order), np.arange(count))  # every row once, in a shuffled order
    assert not np.array_equal(order, np.arange(count))
    np.testing.assert_array_equal(np.concatenate(classes), labels[order])
    assert peak - baseline < cap_mib, f"reading a {count * dim * 2 / 2**20:.0f} MiB file took {peak - baseline:.0f} MiB"


def test_mirrored_strategy_trains_on_two_logical_cpus(featured):
    # An MLP head: trained by Keras, one L2 strength after another.
    set_params(featured, **{"model.head.dense_units": 8, "train.lr_schedule": "cosine", "train.class_weight": "none"})
    result = run(on_two_cpus("train"), featured)
    assert "train: 2 replica(s)" in result.stdout
    rows = history(featured)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[1]["learning_rate"]) < float(rows[0]["learning_rate"])  # cosine decay


def test_nan_loss_stops_the_stage_naming_the_learning_rate(featured):
    set_params(featured, **{"model.head.dense_units": 8, "train.learning_rate": 1e38})  # an MLP head: Keras trains it
    result = run([sys.executable, "-m", "pipeline.stages.train"], featured, check=False)
    assert result.returncode == 2
    assert re.fullmatch(
        r"error: the training loss became nan in epoch 1 \(head phase\): "
        r"train.learning_rate=1e\+38 is probably too high; lower it",
        result.stderr.strip().splitlines()[-1],
    )
    assert not (featured / "data" / "model").exists()


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_exports_a_float32_model(tmp_path, policy):
    import keras

    from pipeline.config import HeadParams, ModelParams
    from pipeline.stages.train import exported

    params = ModelParams(
        backbone="resnet50",
        weights="none",
        image_size=32,
        alpha=None,
        precision="float32",
        head=HeadParams(dense_units=8, dropout=0.1),
    )
    x_train = np.random.default_rng(0).normal(size=(10, 2048)).astype("float32")
    images = np.random.default_rng(1).integers(0, 255, (2, 40, 50, 3), dtype="uint8")
    # Seeded weights: unseeded, bfloat16's rounding (8 significant bits) through 50 random layers once
    # strayed past the tolerance in CI (0.0203); seeded it is 0.006 (bfloat16) and 0.0001 (float16).
    keras.utils.set_random_seed(0)
    with networks.dtype_policy(policy):
        extractor = networks.feature_extractor(params)
        head = networks.head(networks.standardization(x_train), 3, params.head)
        trained = networks.classifier(extractor, head, 32)
        assert networks.backbone_of(extractor).layers[2].compute_dtype == policy.removeprefix("mixed_")
        model = exported(params, extractor, head)
    model.save(tmp_path / "model.keras")
    loaded = networks.load(tmp_path / "model.keras")
    backbone = networks.backbone_of(loaded.get_layer(extractor.name))
    assert {layer.compute_dtype for layer in backbone.layers[1:]} == {"float32"}
    assert {layer.compute_dtype for layer in loaded.layers[1:]} == {"float32"}  # resize, extractor, head
    np.testing.assert_allclose(loaded.predict(images, verbose=0), trained.predict(images, verbose=0), atol=2e-2)


def test_a_float32_extractor_goes_into_the_exported_model_as_it_is():
    """Without fine-tuning train builds the backbone in float32 whatever model.precision says: the
    exported model takes it without a copy, and its resize layer is float32 too."""
    from pipeline.config import HeadParams, ModelParams
    from pipeline.stages.train import exported

    params = ModelParams(
        backbone="mobilenet",
        weights="none",
        image_size=32,
        alpha=0.25,
        precision="mixed_bfloat16",
        head=HeadParams(dense_units=0, dropout=0.1),
    )
    with networks.dtype_policy("mixed_bfloat16"):
        with networks.dtype_policy("float32"):
            extractor = networks.feature_extractor(params)
        head = networks.head(networks.standardization(np.ones((4, 256), "float32")), 2, params.head)
        model = exported(params, extractor, head)
    assert model.get_layer(extractor.name) is extractor
    assert {
        layer.compute_dtype
        for layer in [model.get_layer("resize"), *extractor.layers[1:], *networks.backbone_of(extractor).layers[1:]]
    } == {"float32"}


def test_a_tracking_server_dying_mid_training_ends_it_in_one_line_and_the_rerun_resumes(featured, tmp_path):
    # An MLP head: trained by epochs (the linear head is solved in one go), checkpointed after each.
    epochs = 60
    set_params(
        featured,
        **{
            "model.head.dense_units": 8,
            "train.epochs": epochs,
            "train.early_stopping_patience": None,
            "train.lr_schedule": "constant",
        },
    )
    port, store = free_port(), tmp_path / "store"
    store.mkdir()
    env = {**project_env(featured), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    server = start_mlflow_server(store, port, project_env(store))
    state = featured / "data" / "checkpoints" / f"head-l2-{MLP_L2_GRID[0]:g}" / "state.json"  # the first MLP fit
    try:
        training = subprocess.Popen(
            [sys.executable, "-m", "pipeline.stages.train"],
            cwd=featured,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        while not (state.is_file() and json.loads(state.read_text())["epoch"] >= 3):
            assert training.poll() is None, training.communicate()
            time.sleep(0.02)
    finally:  # mid-training; or, when the test fails, so that no server outlives it
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers
        server.wait()
    killed_at = time.time()
    _, stderr = training.communicate(timeout=300)
    assert time.time() - killed_at < 120  # MLflow's own retries waited minutes per call
    last = stderr.strip().splitlines()[-1]
    assert training.returncode == 2, stderr
    assert last.startswith(f"error: the MLflow tracking store http://127.0.0.1:{port} stopped answering in epoch "), (
        last
    )
    assert (
        "training stopped with its checkpoints kept in data/checkpoints: rerun dvc repro once the store answers" in last
    )
    stopped = json.loads(state.read_text())["epoch"]
    assert 3 <= stopped < epochs and not (featured / "data" / "model").exists()

    server = start_mlflow_server(store, port, project_env(store))  # back, with the same store
    try:
        resumed = run([sys.executable, "-m", "pipeline.stages.train"], featured, env=env)
        assert f"resuming the head phase after epoch {stopped}" in resumed.stdout
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        experiment = load_config(featured / "params.yaml").experiment_name
        runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", order_by=["start_time"])
        assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
        assert len(mlflow.MlflowClient().get_metric_history(runs[-1].info.run_id, "val_accuracy")) == epochs
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
