"""The whole pipeline, for real: `dvc repro` on generated images, MLflow store, fresh-process load."""

import json
import re
import sys

import mlflow

from conftest import run, set_params


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_dvc_repro_end_to_end(project):
    first = run(["dvc", "repro"], project)
    assert stages_run(first.stdout) == ["download", "prepare", "augment", "features", "train", "evaluate"]

    metrics = json.loads((project / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["test_images"] == 6  # 3 classes x round(12 * 0.15)
    assert "accuracy" in run(["dvc", "metrics", "show", "--json"], project).stdout

    # MLflow: one finished run with every param, per-epoch and test metrics, and a registered model.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["flowers"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = runs[0]
    assert logged.data.params["model.backbone"] == "inception_v3"
    assert logged.data.params["train.epochs"] == "3"
    assert logged.data.metrics["test_accuracy"] == metrics["accuracy"]
    history = mlflow.MlflowClient().get_metric_history(logged.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    recorded = json.loads((project / "data" / "model" / "mlflow_run.json").read_text())
    assert recorded["run_id"] == logged.info.run_id
    versions = mlflow.MlflowClient().search_model_versions("name='flowers-classifier'")
    assert [v.run_id for v in versions] == [logged.info.run_id]

    # The logged model loads in a fresh process (no code of ours) and gives one row per raw image.
    load = (
        "import mlflow, numpy as np, sys;"
        f"mlflow.set_tracking_uri('sqlite:///{project / 'mlflow.db'}');"
        "m = mlflow.pyfunc.load_model('models:/flowers-classifier/1');"
        "p = m.predict(np.random.default_rng(0).integers(0, 255, (4, 90, 120, 3), dtype='uint8'));"
        "print(p.shape, bool(np.allclose(p.sum(axis=1), 1, atol=1e-4)))"
    )
    fresh = run([sys.executable, "-c", load], project.parent)
    assert fresh.stdout.strip().splitlines()[-1] == "(4, 3) True"

    # Nothing changed: nothing runs. A training param changed: only train and evaluate run.
    again = run(["dvc", "repro"], project)
    assert stages_run(again.stdout) == []
    set_params(project, **{"train.epochs": 2})
    assert stages_run(run(["dvc", "repro"], project).stdout) == ["train", "evaluate"]
    assert len(mlflow.search_runs(experiment_names=["flowers"], output_format="list")) == 2
