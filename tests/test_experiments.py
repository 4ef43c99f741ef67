"""A grid of DVC experiments logged to a real `mlflow server` on 127.0.0.1, compared with
`pipeline.tools.compare`, and listed by the MLflow UI in headless Chromium on the page `make ui` links to."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from conftest import SMALL_BACKBONE, free_port, input_split, project_env, run, set_params, start_mlflow_server
from pipeline.config import load_config

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def rendered_text(url: str, profile: Path) -> str:
    """The page's text after its JavaScript ran (the MLflow UI is a single-page app), in a fresh
    browser profile and a laptop's window (the runs table draws only the columns in sight): what a
    first visit shows."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed for this test (.ci/run installs it)"
    dom = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1600,1000",
            "--virtual-time-budget=30000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    return re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", " ", dom, flags=re.S))


@contextlib.contextmanager
def mlflow_server(store: Path, env: dict[str, str]) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with its store in ``store``; yields its URI once it answers."""
    port = free_port()
    server = start_mlflow_server(store, port, env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.e2e
def test_experiment_grid_lands_in_mlflow_server_and_ui(project, tmp_path):
    with mlflow_server(tmp_path, project_env(project)) as uri:
        env = {**project_env(project), "MLFLOW_TRACKING_URI": uri}
        set_params(project, **SMALL_BACKBONE)
        run(["git", "add", "-A"], project, env=env)
        run(["git", "commit", "-qm", "baseline"], project, env=env)
        # What `make exp` runs, with a small grid.
        run(["dvc", "exp", "run", "--queue", "-S", "train.epochs=1,2"], project, env=env)
        run(["dvc", "exp", "run", "--run-all", "--jobs", "1"], project, env=env)

        shown = json.loads(run(["dvc", "exp", "show", "--json"], project, env=env).stdout)
        experiments = {e["name"] for rev in shown for e in rev.get("experiments") or [] if e.get("name")}
        assert len(experiments) == 2

        mlflow.set_tracking_uri(uri)
        experiment_name = load_config(project / "params.yaml").experiment_name  # images-<source hash>
        runs = mlflow.search_runs(experiment_names=[experiment_name], output_format="list")
        assert {r.info.run_name for r in runs} == experiments
        assert {r.data.tags["dvc.experiment"] for r in runs} == experiments
        assert all("test_accuracy" in r.data.metrics for r in runs)
        assert sorted(r.data.params["train.epochs"] for r in runs) == ["1", "2"]

        compared = run([sys.executable, "-m", "pipeline.tools.compare"], project, env=env).stdout
        for name in experiments:
            assert name in compared

        experiment = mlflow.get_experiment_by_name(experiment_name)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        # The link `make ui` prints opens the runs table, in the UI's model-training view, on the
        # experiment's saved view "Test scores": the test metrics as columns, best accuracy first.
        link = (
            run([sys.executable, "-m", "pipeline.report.tracking", uri], project, env=env)
            .stdout.strip()
            .splitlines()[-1]
        )
        assert link == (
            f"{uri}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
            "&viewStateShareKey=test-scores"
        )
        page = " ".join(rendered_text(link, tmp_path / "chromium").split())
        assert page.startswith(f"Runs - Experiment {experiment.experiment_id} - MLflow"), page[:300]
        assert "Run Name Created" in page and "Test scores" in page and "Sort: test_accuracy" in page, page
        assert "test_accuracy test_ece test_macro_f1" in page, page  # the metric columns' headers
        assert "Model registry" in page and "Observability" not in page  # the model-training sidebar
        for name in experiments:
            assert name in page, f"run {name} not listed by the MLflow UI"
        # The Dataset column shows each run's data: name (digest) and split.
        for logged in runs:
            shown = {f"{i.dataset.name} ({i.dataset.digest}) {input_split(i)}" for i in logged.inputs.dataset_inputs}
            assert len(shown) == 3 and all(dataset in page for dataset in shown), (shown, page)
