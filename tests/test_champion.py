"""Shipping the best: @champion (what `make serve` serves) moves to a new version only when it beats
the champion on the same prepared data, queued experiments leave it on the best one, and
`make promote EXP=<name>` makes an experiment's model the champion and the workspace's model at once.
The registry pages say what each model is, from which data, and how each version scored."""

import json
import shutil
import sys
from typing import Any

import mlflow
import numpy as np
import pytest

from conftest import REPO, make_images, new_project, run, set_params
from pipeline.config import load_config
from pipeline.model import networks
from pipeline.report import tracking

# ResNet50 at 32 px (random weights whose features keep the colours), an MLP head trained by Keras
# for one epoch (the linear head is solved to its optimum whatever the learning rate: accuracy then
# follows the learning rate), 18 test images.
SETTINGS = {
    "model.backbone": "resnet50",
    "model.image_size": 32,
    "prepare.split.test": 0.3,
    "train.epochs": 1,
    "model.head.dense_units": 16,
    "export.tflite": [],
}
# Queued in this order, the best in the middle (with the MLP head: 1.0, 1.0 with a lower log loss, 0.61).
EXPERIMENTS = {
    "middling": ["train.learning_rate=0.0001"],
    "best": ["train.learning_rate=0.001"],
    "worst": ["train.learning_rate=0.0001", "train.batch_size=64"],
}


@pytest.mark.e2e
def test_queued_experiments_leave_champion_on_the_best_and_make_promote_ships_another(tmp_path):
    project = new_project(tmp_path / "project", make_images(tmp_path / "images", {"red": 20, "green": 20, "blue": 20}))
    set_params(project, **SETTINGS)
    # As in this repository: the MLflow store git-ignored, or dvc exp apply would stash and rewrite
    # mlflow.db (a new file under the open connections of this process).
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    run(["dvc", "repro", "label_issues"], project)  # the baseline's data stages, reused by every experiment
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    for name, overrides in EXPERIMENTS.items():
        run(["dvc", "exp", "run", "--queue", "--name", name, *(f"-S{o}" for o in overrides)], project)
    run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], project)  # what make exp runs

    cfg = load_config(project / "params.yaml")
    names = (cfg.registered_model_name, f"{cfg.registered_model_name}-keras")
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=[cfg.experiment_name], output_format="list", order_by=["start_time"])
    assert [r.info.run_name for r in runs] == list(EXPERIMENTS)  # run in queue order: the worst last
    by_name = {r.info.run_name: r for r in runs}
    accuracy = {name: r.data.metrics["test_accuracy"] for name, r in by_name.items()}
    # Ranked as the champion rule ranks them: accuracy, then the lower log loss.
    rank = {name: (accuracy[name], -r.data.metrics["test_log_loss"]) for name, r in by_name.items()}
    assert rank["worst"] < rank["middling"] < rank["best"], rank
    for name in names:
        assert client.get_model_version_by_alias(name, "champion").run_id == by_name["best"].info.run_id
        assert client.get_model_version_by_alias(name, "candidate").run_id == by_name["worst"].info.run_id
    log = run(["dvc", "queue", "logs", "worst"], project).stdout
    assert (
        f"evaluate: this run's versions stay @candidate: @champion (version 2) scores test accuracy "
        f"{accuracy['best']:.4f} vs this run's {accuracy['worst']:.4f} on the same test data; "
        "make promote EXP=worst ships them"
    ) in log

    # The registry pages: what each registered model is for, and each version's scores and lineage.
    best = by_name["best"]
    version = client.get_model_version_by_alias(cfg.registered_model_name, "champion")
    interval = mlflow.artifacts.load_dict(f"runs:/{best.info.run_id}/reports/metrics.json")["accuracy_ci95"]
    assert version.tags == {
        "test_accuracy": f"{accuracy['best']:.4f} (95 % interval {interval['low']:.4f}-{interval['high']:.4f}, "
        "18 test images)",
        "test_macro_f1": version.tags["test_macro_f1"],
        "dataset": "images",
        "data.source": str(tmp_path / "images"),
        "data.manifest_sha256": best.data.tags["data.manifest_sha256"],
        "classes": "blue, green, red",
        "backbone": "resnet50 at 32 px",
        "dvc.experiment": "best",
    }
    served, weights = (client.get_registered_model(name).description for name in names)
    assert served.startswith("Classifies photos into 3 classes (blue, green, red)")
    assert "This is the model to serve" in served and f"models:/{names[0]}@champion" in served
    assert f"The Keras weights behind {names[0]} (serve that one)" in weights
    assert not {"test_top_k", "test_test_images"} & set(best.data.metrics)
    assert (best.data.tags["test_top_k"], best.data.tags["test_images"]) == ("2", "18")

    refused = run([sys.executable, "-m", "pipeline.tools.promote", "nope"], project, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: no DVC experiment named 'nope': `dvc exp list --all-commits` lists them (a queued one must "
        "have run: dvc queue status)"
    ]

    shipped = run(["make", "-s", "-o", "setup", "promote", "EXP=worst"], project)  # the project's Makefile, for real
    assert shipped.stdout.strip().splitlines()[-1] == (
        f"promote: @champion is now models:/{names[1]}/3, models:/{names[0]}/3 (experiment worst, now in the "
        "workspace: data/model); make serve serves it"
    )
    recorded = json.loads((project / "data" / "model" / "mlflow_run.json").read_text())
    assert recorded["run_id"] == by_name["worst"].info.run_id
    for name in names:
        assert client.get_model_version_by_alias(name, "champion").run_id == by_name["worst"].info.run_id
    assert load_config(project / "params.yaml").train.batch_size == 64  # the experiment's params
    assert "train" not in json.loads(run(["dvc", "status", "--json"], project).stdout)
    # The served model's weights are data/model's.
    champion = mlflow.keras.load_model(f"models:/{names[1]}@champion")
    for ours, theirs in zip(
        networks.load(project / "data" / "model" / "model.keras").get_weights(), champion.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)


# ---- the rule, on a real MLflow store ----------------------------------------------------------


@pytest.fixture
def registry(tmp_path) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    return mlflow.MlflowClient()


def version(client: mlflow.MlflowClient, data: str, **scores: float) -> tuple[dict, dict]:
    """A run on prepared data ``data`` with test ``scores``, its registered version, as evaluate has them:
    (mlflow_run.json's record, metrics.json's report)."""
    report: dict[str, Any] = {"accuracy": 0.9, "log_loss": 0.3, "ece": 0.05, "macro": {"f1": 0.9}}
    report.update({k: v for k, v in scores.items() if k != "macro_f1"})
    report["macro"]["f1"] = scores.get("macro_f1", 0.9)
    with mlflow.start_run() as logged:
        mlflow.set_tag(tracking.DATA_HASH_TAG, data)
    if not client.search_registered_models("name='m'"):
        client.create_registered_model("m")
    number = client.create_model_version("m", f"runs:/{logged.info.run_id}/model", logged.info.run_id).version
    return {
        "run_id": logged.info.run_id,
        "models": {"image_classifier": {"registered_model": "m", "version": number, "model_id": None}},
    }, report


def evaluated(client: mlflow.MlflowClient, record: dict, report: dict, metric: str = "accuracy") -> str | None:
    """What evaluate does: log the test metrics, then move @champion unless it stays (the reason)."""
    with mlflow.start_run(run_id=record["run_id"]):
        mlflow.log_metrics({f"test_{k}": v for k, v in tracking.flatten(report, separator="_").items()})
    reason = tracking.champion_stays(record, report, metric)
    if reason is None:
        tracking.promote(record)
    return reason


def champion(client: mlflow.MlflowClient) -> int:
    return int(client.get_model_version_by_alias("m", "champion").version)


def test_champion_moves_only_for_a_better_score_on_the_same_data(registry):
    assert evaluated(registry, *version(registry, "data1", accuracy=0.8)) is None  # the first is champion
    assert evaluated(registry, *version(registry, "data1", accuracy=0.9)) is None  # better
    assert champion(registry) == 2
    assert evaluated(registry, *version(registry, "data1", accuracy=0.85)) == (
        "@champion (version 2) scores test accuracy 0.9000 vs this run's 0.8500 on the same test data"
    )
    assert evaluated(registry, *version(registry, "data1", accuracy=0.9)) == (  # a tie, log loss too
        "@champion (version 2) scores test accuracy 0.9000 vs this run's 0.9000 and log loss 0.3000 vs "
        "0.3000 on the same test data"
    )
    assert evaluated(registry, *version(registry, "data1", accuracy=0.9, log_loss=0.2)) is None  # tie, lower loss
    assert champion(registry) == 5
    assert evaluated(registry, *version(registry, "data2", accuracy=0.99)) == (
        "@champion (version 5) was tested on other data (prepared data data1, this run's data2)"
    )
    assert champion(registry) == 5
    # Lower wins for log loss (and ECE), whatever the accuracy.
    assert evaluated(registry, *version(registry, "data1", accuracy=0.5, log_loss=0.1), metric="log_loss") is None
    assert champion(registry) == 7
    record, report = version(registry, "data1", accuracy=0.95, macro_f1=0.95)
    assert evaluated(registry, record, report, metric="macro_f1") is None
    assert tracking.champion_stays(record, report, "accuracy") is None  # re-evaluating the champion keeps it
