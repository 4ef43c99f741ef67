"""One seed, one model: the same params, data and seed train the same model whether the run is a
DVC experiment (what `make run SET=...` runs), a plain `dvc repro` logging to an MLflow server, a
`dvc repro` killed in the middle of training and run again, or stages run by warm workers (`make
warm`); and MLflow names each run meaningfully."""

import csv
from pathlib import Path

import mlflow
import pytest
from test_experiments import mlflow_server
from test_train import kill_after_epoch, start_in_own_group
from test_warm import ran_warm, warm_workers

from conftest import make_images, new_project, project_env, run, set_params
from pipeline.config import load_config
from pipeline.paths import HISTORY, METRICS

pytestmark = pytest.mark.e2e  # whole pipelines: out of make test-fast

# ResNet50 at 32 px: random weights whose features still carry the images' colours, so that the
# trained model depends on its initial weights (MobileNet's vanish: 1e-17, and every seed gives
# the same constant model). Fine-tuning on: its layers are built after the head phase.
SETTINGS = {
    "model.backbone": "resnet50",
    "model.image_size": 32,
    "train.fine_tune.blocks": 1,
    "train.fine_tune.epochs": 6,
    "train.early_stopping_patience": None,
    "export.tflite": [],
}


def results(project: Path) -> tuple[str, list[dict[str, str]]]:
    """eval/metrics.json, and eval/history.csv without its wall times."""
    with open(project / HISTORY, newline="") as fh:
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]
    return (project / METRICS).read_text(), history


def forget_results(project: Path) -> None:
    for path in (METRICS, HISTORY):
        (project / path).unlink()


def test_same_params_data_and_seed_train_one_model_however_the_run_is_started(tmp_path):
    project = new_project(tmp_path / "project", make_images(tmp_path / "images", {"red": 12, "green": 12, "blue": 12}))
    set_params(project, **SETTINGS)
    run(["dvc", "repro", "features"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)

    run(["dvc", "exp", "run", "-S", "train.epochs=4"], project)  # make run SET="train.epochs=4"
    expected = results(project)
    [experiment] = run(["dvc", "exp", "list", "--name-only"], project).stdout.split()

    # The same params (the experiment left them in params.yaml), by a plain dvc repro that logs to a
    # tracking server.
    with mlflow_server(tmp_path, project_env(project)) as uri:
        env = {**project_env(project), "MLFLOW_TRACKING_URI": uri}
        forget_results(project)
        for stage in ("train", "evaluate"):
            run(["dvc", "repro", "-f", "-s", stage], project, env=env)
        assert results(project) == expected
        mlflow.set_tracking_uri(uri)
        on_server = mlflow.search_runs(search_all_experiments=True, output_format="list")

    # Killed in its first fine-tuning epoch, then run again: it resumes from the checkpoint.
    forget_results(project)
    first_fine_tune_epoch = next(int(row["epoch"]) for row in expected[1] if row["phase"] == "fine_tune")
    killed = start_in_own_group(["dvc", "repro", "-f", "-s", "train"], project)
    reached = kill_after_epoch(
        killed, project / "data" / "checkpoints" / "fine_tune" / "state.json", first_fine_tune_epoch
    )
    resumed = run(["dvc", "repro", "-f", "-s", "train"], project)
    assert f"resuming the fine_tune phase after epoch {reached}" in resumed.stdout
    run(["dvc", "repro", "-f", "-s", "evaluate"], project)
    assert results(project) == expected

    # Runs are named after their DVC experiment, else after the dataset and the params.
    name = load_config(project / "params.yaml").run_name
    assert name.startswith("images-params-")
    assert [r.info.run_name for r in on_server] == [name]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    local = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["start_time"])
    assert [(r.info.run_name, r.info.status) for r in local] == [
        (experiment, "FINISHED"),
        (name, "KILLED"),
        (name, "FINISHED"),
    ]
    assert local[0].data.tags["dvc.experiment"] == experiment and "dvc.experiment" not in local[-1].data.tags

    # Each stage in a process that imported TensorFlow before it (pipeline/warm.py).
    forget_results(project)
    with warm_workers(project):
        for stage in ("train", "evaluate"):
            run(["dvc", "repro", "-f", "-s", stage], project)
        assert ran_warm(project) == ["train 0", "evaluate 0"]
    assert results(project) == expected
