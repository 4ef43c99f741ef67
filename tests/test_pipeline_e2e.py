"""The whole pipeline, for real: one `dvc repro` on generated images, then everything a user does
with the result — MLflow runs and registry, a model server, DVC plots, the accuracy gate, sharing
through a DVC remote, and what reruns when something changes.

The trained project is shared by the module's tests, so a test that changes a project (params,
models, registry, Git) works on its own copy (:func:`own_copy`): the tests pass in any order."""

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from test_report import chromium

from conftest import (
    free_port,
    image_request,
    input_split,
    make_images,
    model_server,
    new_project,
    project_env,
    run,
    set_params,
    stages_run,
)
from pipeline import serving
from pipeline.config import Config, load_config
from pipeline.data.manifests import read_test_probabilities, split_files
from pipeline.model import feature_store, networks
from pipeline.paths import HISTORY, MODEL_FILE
from pipeline.report.mlflow_ui import runs_url

pytestmark = pytest.mark.e2e

CLASSES = {"red": 12, "green": 12, "blue": 12}
STAGES = ["download", "prepare", "augment", "features", "label_issues", "train", "evaluate", "export"]  # in order


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("e2e")
    project = new_project(tmp / "project", make_images(tmp / "images", CLASSES))
    set_params(project, **{"export.tflite": ["float32"]})  # a TFLite file too: its converter's noise is filtered
    # System metrics every second (MLflow's own setting; 10 s by default, longer than these stages).
    # TF_ENABLE_ONEDNN_OPTS=on is no value TensorFlow takes: it warns (and keeps oneDNN on), a
    # warning test_console_shows_warnings_not_tensorflow_noise expects to see.
    env = {**project_env(project), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "TF_ENABLE_ONEDNN_OPTS": "on"}
    result = run(["dvc", "repro"], project, env=env)
    run([sys.executable, "-m", "pipeline.tools.plots_page"], project)  # as make setup does: dvc plots show's page
    return project, result.stdout + result.stderr


@pytest.fixture
def cfg(trained) -> Config:
    """The project's params: its MLflow experiment and registered model names (images-<hash>...)."""
    return load_config(trained[0] / "params.yaml")


@pytest.fixture
def client(trained) -> mlflow.MlflowClient:
    return client_of(trained[0])


def client_of(project: Path) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.MlflowClient()


def own_copy(project: Path, tmp_path: Path) -> Path:
    """A copy of the trained project for a test that changes it, with its own DVC cache, Git history
    and MLflow store. (Its store keeps the original's artifact folder, an absolute path: runs the
    copy adds leave their files there, under run and model ids the original's store never lists.)"""
    return Path(shutil.copytree(project, tmp_path / "copy", symlinks=True))


def in_fresh_process(code: str, cwd: Path) -> str:
    return run([sys.executable, "-c", code], cwd).stdout.strip().splitlines()[-1]


def jpeg_bytes(project: Path) -> bytes:
    return next((project / "data" / "prepared" / "images" / "red").glob("*.jpg")).read_bytes()


def test_all_stages_run_and_write_metrics(trained):
    project, output = trained
    assert stages_run(output) == STAGES
    # Every split's originals are scored (36), not the training images' augmented copies.
    summary = next(line for line in output.splitlines() if line.startswith("label_issues: "))
    assert (
        " of 36 images flagged as likely mislabelled (reports/label_issues.csv); 20 fits (5 folds x 4 C) on " in summary
    )
    assert (project / "reports" / "label_issues.csv").read_text().splitlines()[
        0
    ] == "source,split,given,suggested,score"
    metrics = json.loads((project / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["test_images"] == 6  # 3 classes x round(12 * 0.15)
    assert set(metrics["per_class"]) == set(CLASSES)
    assert sum(c["support"] for c in metrics["per_class"].values()) == 6
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    assert shown[""]["data"]["eval/metrics.json"]["data"]["accuracy"] == metrics["accuracy"]


def test_mlflow_run_has_params_tags_metrics_and_artifacts(trained, client, cfg):
    project, _ = trained
    assert cfg.experiment_name.startswith("images-")
    runs = mlflow.search_runs(experiment_names=[cfg.experiment_name], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = runs[0]
    assert logged.info.run_name == cfg.run_name  # a dvc repro's run: dataset and params, not a random name
    assert logged.data.params["model.backbone"] == "inception_v3"
    assert logged.data.params["prepare.split.val"] == "0.15"
    assert logged.data.tags["mlflow.source.git.commit"] is not None
    assert len(logged.data.tags["data.manifest_sha256"]) == 64
    metrics = json.loads((project / "eval" / "metrics.json").read_text())
    assert logged.data.metrics["test_accuracy"] == metrics["accuracy"]
    assert logged.data.metrics["test_macro_f1"] == metrics["macro"]["f1"]
    with open(project / HISTORY, newline="", encoding="utf-8") as fh:
        steps = [int(row["epoch"]) for row in csv.DictReader(fh)]  # the linear head's L2 strengths tried
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "val_accuracy")] == steps
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 3
    assert "head_l2" in logged.data.metrics
    assert logged.data.metrics["test_accuracy_ci95_low"] == metrics["accuracy_ci95"]["low"]
    assert not {"test_top_k", "test_test_images"} & set(logged.data.metrics)  # counts: tags
    assert (logged.data.tags["test_top_k"], logged.data.tags["test_images"]) == ("2", "6")
    recorded = json.loads((project / "data" / "model" / "mlflow_run.json").read_text())
    assert recorded["run_id"] == logged.info.run_id
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/reliability.png", "plots/gradcam.png"} <= artifacts
    reports = {a.path for a in client.list_artifacts(logged.info.run_id, "reports")}
    assert {
        "reports/metrics.json",
        "reports/data.json",
        "reports/labels.json",
        "reports/augment_gallery.png",
        "reports/quarantine.csv",
        "reports/label_issues.csv",
        "reports/label_issues.png",
    } <= reports
    assert any(key.startswith("system/cpu_utilization") for key in logged.data.metrics)
    assert "system/system_memory_usage_megabytes" in logged.data.metrics
    # A model-training experiment: the UI opens it on its runs, not on GenAI traces.
    assert client.get_experiment(logged.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_mlflow_run_has_the_prepared_data_as_one_dataset_input_per_split(trained, client, cfg):
    project, _ = trained
    logged = mlflow.search_runs(experiment_names=[cfg.experiment_name], output_format="list")[0]
    inputs = {input_split(i): i.dataset for i in logged.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    manifest = pd.read_csv(project / "data" / "prepared" / "manifest.csv")
    for split, dataset in inputs.items():
        assert dataset.name == "images"  # the dataset's name, from data.url
        assert json.loads(dataset.source) == {"uri": str(project.parent / "images")}
        assert json.loads(dataset.profile)["num_rows"] == (manifest["split"] == split).sum()
    assert len({d.digest for d in inputs.values()}) == 3


def test_registry_has_one_name_per_model_kind_with_candidate_and_champion(trained, client, cfg):
    project, _ = trained
    recorded = json.loads((project / "data" / "model" / "mlflow_run.json").read_text())
    served = cfg.registered_model_name
    for name, kind in [(served, "image_classifier"), (f"{served}-keras", "model")]:
        versions = client.search_model_versions(f"name='{name}'")
        assert [v.run_id for v in versions] == [recorded["run_id"]]
        # No evaluate.min_accuracy and no champion before: the evaluated version is the champion.
        assert client.get_registered_model(name).aliases == {"candidate": 1, "champion": 1}
        assert versions[0].tags["dvc.experiment"] == "none (dvc repro)"
        accuracy = json.loads((project / "eval" / "metrics.json").read_text())["accuracy"]
        assert versions[0].tags["test_accuracy"].startswith(f"{accuracy:.4f} (95 % interval ")
        assert {k: v for k, v in recorded["models"][kind].items() if k != "model_id"} == {
            "registered_model": name,
            "version": 1,
        }
        assert mlflow.get_logged_model(recorded["models"][kind]["model_id"]).name == kind
    # The test metrics are on each logged model too (the UI's Models tab), on the test dataset.
    metrics = json.loads((project / "eval" / "metrics.json").read_text())
    for model in recorded["models"].values():
        on_model = {m.key: m for m in mlflow.get_logged_model(model["model_id"]).metrics}
        assert on_model["test_accuracy"].value == metrics["accuracy"]
        assert on_model["test_accuracy"].dataset_name == "images"
    # One copy of the weights per run: the served model names the Keras model instead of holding its own.
    sizes = {
        kind: sum(f.stat().st_size for f in logged_model_dir(model["model_id"]).rglob("*") if f.is_file())
        for kind, model in recorded["models"].items()
    }
    assert sizes["image_classifier"] < sizes["model"] / 100
    config = mlflow.models.get_model_info(f"models:/{served}@champion").flavors["python_function"]["config"]
    assert config == {
        "keras_model": f"models:/{recorded['models']['model']['model_id']}",
        "labels": ["blue", "green", "red"],
    }


def logged_model_dir(model_id: str) -> Path:
    return Path(mlflow.get_logged_model(model_id).artifact_location.removeprefix("file://"))


def test_registered_model_classifies_image_bytes_in_a_fresh_process(trained, cfg):
    project, _ = trained
    image = project / "data" / "prepared" / "images" / "red"
    code = (
        "import mlflow, pandas as pd, pathlib, json;"
        f"mlflow.set_tracking_uri('sqlite:///{project / 'mlflow.db'}');"
        f"m = mlflow.pyfunc.load_model('models:/{cfg.registered_model_name}@champion');"
        f"files = sorted(pathlib.Path('{image}').glob('*.jpg'))[:3];"
        "out = m.predict(pd.DataFrame({'image': [f.read_bytes() for f in files]}), params={'top_k': 2});"
        "print(json.dumps({'labels': out['label'].tolist(), 'top_k': out['top_k'].tolist()}))"
    )
    answer = json.loads(in_fresh_process(code, project.parent))
    assert set(answer["labels"]) <= set(CLASSES) and len(answer["labels"]) == 3
    assert [len(ranked) for ranked in answer["top_k"]] == [2, 2, 2]
    assert [ranked[0]["label"] for ranked in answer["top_k"]] == answer["labels"]


def test_keras_flavor_takes_raw_uint8_batches_of_any_size(trained):
    project, _ = trained
    run_id = json.loads((project / "data" / "model" / "mlflow_run.json").read_text())["run_id"]
    code = (
        "import mlflow, numpy as np;"
        f"mlflow.set_tracking_uri('sqlite:///{project / 'mlflow.db'}');"
        f"m = mlflow.pyfunc.load_model('runs:/{run_id}/model');"
        "p = m.predict(np.random.default_rng(0).integers(0, 255, (4, 90, 120, 3), dtype='uint8'));"
        "print(p.shape, bool(np.allclose(p.sum(axis=1), 1, atol=1e-4)))"
    )
    assert in_fresh_process(code, project.parent) == "(4, 3) True"


def test_make_serve_serves_the_champion_with_top_k_as_a_list(trained, cfg):
    project, _ = trained
    image = jpeg_bytes(project)
    with model_server(project) as url:  # make serve's default model: models:/images-<hash>-classifier@champion
        response = requests.post(f"{url}/invocations", json=image_request([image]), timeout=60)
    assert response.status_code == 200, response.text
    served = response.json()["predictions"][0]
    # The server's answer is the champion's answer for that image.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    local = mlflow.pyfunc.load_model(f"models:/{cfg.registered_model_name}/1")
    expected = local.predict(pd.DataFrame({"image": [image]})).iloc[0]
    assert served["label"] == expected["label"]
    assert served["probability"] == pytest.approx(expected["probability"], abs=1e-5)
    assert [p["label"] for p in served["top_k"]] == [p["label"] for p in expected["top_k"]]
    assert served["top_k"][0] == {"label": served["label"], "probability": served["probability"]}


def test_evaluate_scores_with_the_head_alone_what_the_whole_model_answers(trained, monkeypatch):
    # Not fine-tuned: evaluate ran the head on the features stage's backbone outputs for the test files
    # as served. The whole model on the same files, decoded by the server's code, must agree.
    project, _ = trained
    monkeypatch.chdir(project)  # the paths below are the project's
    _, paths = split_files("test")
    assert feature_store.served_test(paths) is not None
    model = networks.load(MODEL_FILE)
    images = np.concatenate(list(serving.file_batches(paths, networks.input_size(model), 8)))
    np.testing.assert_allclose(read_test_probabilities(paths), model.predict(images, verbose=0), atol=1e-5)


def test_console_shows_warnings_not_tensorflow_noise(trained):
    _, console = trained
    # No INFO line of TensorFlow's C++ log (oneDNN is on, ...), nor absl's notice that nothing called
    # absl::InitializeLog(); no false E0000 (tf.data's use_unbounded_threadpool under op determinism)
    # nor the TFLite converter's warnings about options it sets itself.
    assert not re.search(r"^[IE]\d{4} ", console, re.M), console
    assert "absl::InitializeLog" not in console and "Ignored output_format" not in console, console
    assert not re.search(r" INFO mlflow", console), console  # MLflow's notes (MLFLOW_LOGGING_LEVEL)
    # What the user has to fix still shows, in every stage that loads TensorFlow.
    warned = re.findall(
        r"^W\d{4} .*\] TF_ENABLE_ONEDNN_OPTS is not set to either '0', 'false', '1', or 'true'", console, re.M
    )
    assert len(warned) >= 5, console  # augment, features, train, evaluate, export


def test_training_curves_of_a_commit_need_no_dvc_cache(trained, tmp_path):
    """eval/history.csv is in Git: `dvc plots diff` draws a commit's (or an experiment's) training
    curves where neither the DVC cache nor the outputs are, as in a fresh clone."""
    project, _ = trained
    local = shutil.ignore_patterns("cache", "data", ".cache-test", "mlartifacts", "mlflow.db")
    clone = Path(shutil.copytree(project, tmp_path / "clone", ignore=local))
    run(["git", "add", "-A"], clone)
    run(["git", "commit", "-qm", "trained"], clone)
    shown = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json"], clone).stdout)
    points = shown["data"]["Training loss"][0]["content"]["data"]["values"]
    drawn = [(p["epoch"], p["dvc_inferred_y_value"]) for p in points if p["rev"] == "HEAD" and p["field"] == "val_loss"]
    with open(project / HISTORY, newline="", encoding="utf-8") as fh:
        assert drawn == [(row["epoch"], row["val_loss"]) for row in csv.DictReader(fh)] and len(drawn) > 3


def test_dvc_plots_render_to_html_that_draws_its_charts_offline(trained, tmp_path):
    project, _ = trained
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], project)
    page = tmp_path / "plots" / "index.html"
    html = page.read_text()
    assert "Test confusion matrix" in html and "Training loss" in html
    # Every Vega chart drawn (an svg of class marks each) with no network: every http(s) request goes to a
    # proxy that is not there. DVC's own page, which loads Vega from a CDN, draws none.
    no_network = f"--proxy-server=127.0.0.1:{free_port()}"
    dom = chromium(
        no_network,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=30000",
        "--dump-dom",
        page.as_uri(),
    ).stdout
    charts = html.count("vegaEmbed('#")
    assert charts >= 3 and dom.count('class="marks"') == charts, dom[-3000:]
    images = list((tmp_path / "plots" / "static").glob("*.png"))
    assert any("gradcam" in p.name for p in images) and any("reliability" in p.name for p in images)
    assert any("label_issues" in p.name for p in images)


def test_accuracy_gate_fails_the_stage_and_moves_champion_only_when_passed(trained, tmp_path, cfg):
    project = own_copy(trained[0], tmp_path)
    client = client_of(project)
    served = cfg.registered_model_name
    for name in (served, f"{served}-keras"):
        client.delete_registered_model_alias(name, "champion")
    # A model that always answers the first class: exactly 2 of 6 test images right.
    from pipeline.model import networks

    model = networks.load(project / "data" / "model" / "model.keras")
    dense = model.get_layer("head").get_layer("probabilities")
    kernel, bias = dense.get_weights()
    dense.set_weights([np.zeros_like(kernel), np.eye(len(bias))[0] * 10])
    model.save(project / "data" / "model" / "model.keras")
    set_params(project, **{"evaluate.min_accuracy": 0.5})
    result = run([sys.executable, "-m", "pipeline.stages.evaluate"], project, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: test accuracy 0.3333 is below evaluate.min_accuracy 0.5; @champion stays where it was"
    )
    assert json.loads((project / "eval" / "metrics.json").read_text())["accuracy"] == 0.3333
    assert client.get_registered_model(served).aliases == {"candidate": 1}

    set_params(project, **{"evaluate.min_accuracy": 0.3})
    passed = run([sys.executable, "-m", "pipeline.stages.evaluate"], project)
    assert f"evaluate: @champion is now models:/{served}-keras/1, models:/{served}/1" in passed.stdout
    for name in (served, f"{served}-keras"):
        assert client.get_registered_model(name).aliases == {"candidate": 1, "champion": 1}


def test_unreachable_tracking_server_stops_training_before_it_starts(trained):
    project, _ = trained
    model = project / "data" / "model" / "model.keras"
    before = model.read_bytes()
    env = {**project_env(project), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    result = run([sys.executable, "-m", "pipeline.stages.train"], project, check=False, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: MLflow tracking server http://127.0.0.1:")
    assert "Epoch" not in result.stdout  # no training happened
    assert model.read_bytes() == before


def test_push_then_pull_into_a_fresh_clone_runs_nothing(trained, tmp_path):
    project = own_copy(trained[0], tmp_path)
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "trained"], project)
    run(["dvc", "push"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert (clone / "data" / "model" / "model.keras").is_file()
    assert stages_run(run(["dvc", "repro"], clone).stdout) == []
    # DVC's model registry finds the model by name, straight from the repository and its remote:
    # a version is a Git tag that GTO (installed with DVC) writes.
    run(["gto", "register", "image-classifier"], project)
    fetched = tmp_path / "fetched.keras"
    run(["dvc", "artifacts", "get", str(project), "image-classifier", "-o", str(fetched)], tmp_path)
    assert fetched.read_bytes() == (project / "data" / "model" / "model.keras").read_bytes()


def test_only_what_changed_reruns(trained, tmp_path, cfg):
    project = own_copy(trained[0], tmp_path)
    client = client_of(project)
    assert stages_run(run(["dvc", "repro"], project).stdout) == []
    set_params(project, **{"train.epochs": 2})
    # The documented quicker loop (docs/experiments.md): naming evaluate leaves export out; a later repro runs only export,
    # on the probabilities of the new model that evaluate left.
    evaluated = run(["dvc", "repro", "evaluate"], project).stdout
    assert stages_run(evaluated) == ["train", "evaluate"]
    assert stages_run(run(["dvc", "repro"], project).stdout) == ["export"]
    assert len(mlflow.search_runs(experiment_names=[cfg.experiment_name], output_format="list")) == 2
    # The new run's versions are the candidate; the champion only if they scored better (evaluate says which).
    served = cfg.registered_model_name
    moved = f"evaluate: @champion is now models:/{served}-keras/2, models:/{served}/2" in evaluated
    assert moved or "evaluate: this run's versions stay @candidate: @champion (version 1) scores" in evaluated
    assert client.get_registered_model(served).aliases == {"candidate": 2, "champion": 2 if moved else 1}


def test_editing_a_module_marks_the_stages_that_run_it_as_changed(trained):
    project, _ = trained
    module = project / "pipeline" / "data" / "images.py"  # decides every prepared pixel
    original = module.read_text(encoding="utf-8")
    try:
        module.write_text(original + "\n# edited\n", encoding="utf-8")
        changed = json.loads(run(["dvc", "status", "--json"], project).stdout)
    finally:
        module.write_text(original, encoding="utf-8")
    assert "pipeline/data/images.py" in json.dumps(changed["prepare"])
    assert "download" not in changed  # it never imports images.py
    assert "prepare" not in json.loads(run(["dvc", "status", "--json"], project).stdout)


def test_summary_says_what_the_run_scored_and_where_to_look(trained, cfg):
    project, _ = trained
    metrics = json.loads((project / "eval" / "metrics.json").read_text())
    shown = run([sys.executable, "-m", "pipeline.tools.summary"], project).stdout.splitlines()
    accuracy, f1 = metrics["accuracy_ci95"], metrics["macro_f1_ci95"]
    assert shown[0].startswith(
        f"test accuracy {metrics['accuracy']:.3f} ({accuracy['low']:.3f}-{accuracy['high']:.3f}), "
        f"macro F1 {metrics['macro']['f1']:.3f} ({f1['low']:.3f}-{f1['high']:.3f})"
    )
    # 6 test images: the interval is far wider than +-5 points, and the summary says so.
    assert shown[1].startswith("warning: 6 test images measure accuracy only to +-")
    recorded = json.loads((project / "data" / "model" / "mlflow_run.json").read_text())
    assert any(recorded["run_id"] in line and f"experiment '{cfg.experiment_name}'" in line for line in shown)
    link = runs_url("http://127.0.0.1:5000", recorded["experiment_id"])  # on the saved view of the test scores
    assert f"runs with their test scores: make ui, then {link}" in shown
    assert len(shown) <= 9 and all(len(line) < 200 for line in shown)
    times = next(line for line in shown if line.startswith("stage wall times"))
    assert re.findall(r"(\w+) \d+\.\d s", times) == STAGES, times
