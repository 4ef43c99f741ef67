"""MLflow set-up shared by the stages that log: where runs go and which run a pipeline run is.

By default runs go to a local SQLite store, ``mlflow.db`` in the project root, with artifacts in
``mlartifacts/`` beside it (``make ui`` shows them). The project root is DVC's ``DVC_ROOT``, which
DVC points at the main workspace even for queued experiments that run in a temporary copy, so
``dvc exp run --queue`` runs land in the same store. ``MLFLOW_TRACKING_URI`` points everything at
another store, e.g. a team's ``mlflow server``.

One pipeline run is one MLflow run: ``train`` starts it and records its id in
``data/model/mlflow_run.json`` (a DVC output); ``evaluate`` reopens it to add test metrics and plots.
"""

import hashlib
import os
import re
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import requests
import tensorflow as tf
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from pipeline.cli import UserError, redact_url
from pipeline.config import flatten
from pipeline.files import read_json, write_json

SECRET_KEY = re.compile(r"password|passwd|secret|token|api_?key|credential", re.IGNORECASE)
RUN_FILE = Path("data/model/mlflow_run.json")  # written by train, read by evaluate
# Per-class metric keys (test_per_class_<key>_recall). MLflow takes letters, digits, _ - . space : /
# in a metric key, at most 250 characters (mlflow.utils.validation); a class name is any folder name.
CLASS_KEY_LENGTH = 100  # leaves room for test_per_class_..._precision within MLflow's 250
KEY_CHARACTERS = "A-Za-z0-9_-"  # of those MLflow takes; "." is kept to mark a changed name
PLAIN_CLASS_KEY = re.compile(f"[{KEY_CHARACTERS}]{{1,{CLASS_KEY_LENGTH}}}")  # such a name is its own key
NOT_KEY_CHARACTER = re.compile(f"[^{KEY_CHARACTERS}]")
CLASS_KEYS_ARTIFACT = "reports/class_keys.json"  # per-class key -> class name, logged with the metrics


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside its database; a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def check_reachable() -> None:
    """Fail before any training when a tracking server is configured but does not answer.

    Training is not started against a store that cannot take its results; once a run has started,
    the model files are written to ``data/model`` before anything is sent to MLflow.
    """
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
    except requests.RequestException as err:
        raise UserError(
            f"MLflow tracking server {redact_url(uri)} does not answer ({type(err).__name__}): start it, "
            "or unset MLFLOW_TRACKING_URI to log to the local store"
        ) from None


def loggable_params(params: dict[str, Any]) -> dict[str, Any]:
    """Params safe to log: secret-looking keys masked, credentials stripped from URLs."""
    return {
        key: "***" if SECRET_KEY.search(key) and value is not None
        else redact_url(value) if isinstance(value, str) else value
        for key, value in params.items()
    }


def start_new_run(experiment_name: str) -> mlflow.ActiveRun:
    """A new run in ``experiment_name``, named after the DVC experiment when there is one."""
    check_reachable()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(experiment_name, artifact_location=artifact_location(uri))
    else:
        experiment_id = experiment.experiment_id
    return mlflow.start_run(experiment_id=experiment_id, run_name=os.environ.get("DVC_EXP_NAME"),
                            tags=lineage_tags())


def lineage_tags() -> dict[str, str]:
    """Tags that tie the run to its code (git commit), DVC experiment and data."""
    tags = {}
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git_head()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    manifest = Path("data/prepared/manifest.csv")
    if manifest.is_file():  # files, labels and split of every image: one hash for "the data"
        tags["data.manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    download = Path("reports/download.json")
    archive_sha256 = read_json(download).get("sha256") if download.is_file() else None
    if archive_sha256:  # null for a local folder source
        tags["data.archive_sha256"] = archive_sha256
    return tags


def _git_head() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or None


def log_epoch_metrics(prefix: str = "") -> keras.callbacks.Callback:
    """A Keras callback logging each epoch's metrics (loss, accuracy, val_*) to the active run."""
    return keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in logs.items()},
                                                             step=epoch + 1)
    )


def class_keys(labels: list[str]) -> list[str]:
    """One metric-key part per class, valid in MLflow and unique: the name itself when it is plain
    (ASCII letters, digits, ``_``, ``-``; at most 100 characters), else the name in ASCII with every
    other character as ``_``, cut to 100, plus ``.`` and the class index: ``Ünïcode, cats`` (class 0)
    -> ``Unicode__cats.0``, ``a b`` (class 3) -> ``a_b.3`` beside a class ``a_b``. Plain names have
    no ``.`` and the indices differ, so no two keys are the same."""
    return [label if PLAIN_CLASS_KEY.fullmatch(label) else f"{_ascii_key(label)}.{index}"
            for index, label in enumerate(labels)]


def _ascii_key(name: str) -> str:
    letters = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))  # Ü -> U
    return NOT_KEY_CHARACTER.sub("_", letters)[:CLASS_KEY_LENGTH]


def log_test_metrics(report: dict) -> None:
    """The numbers of ``eval/metrics.json`` as metrics of the active run: ``test_`` and their path
    joined by ``_`` (``test_accuracy``, ``test_macro_f1``, ``test_per_class_<key>_recall`` with the
    keys of :func:`class_keys`), and the class names of those keys as ``reports/class_keys.json``."""
    names = list(report["per_class"])
    keys = class_keys(names)
    per_class = dict(zip(keys, report["per_class"].values(), strict=True))
    mlflow.log_metrics(flatten({**report, "per_class": per_class}, separator="_", prefix="test_"))
    mlflow.log_dict(dict(zip(keys, names, strict=True)), CLASS_KEYS_ARTIFACT)


def log_model(model: keras.Model, model_dir: Path, registered_name: str | None) -> None:
    """Log the trained model twice: as Keras (tensors in) and as a servable image-bytes model.

    - ``model``: the ``mlflow.keras`` flavor, uint8 batches ``(n, h, w, 3)`` -> probabilities,
      registered as ``<name>-keras``.
    - ``image_classifier``: a pyfunc taking a column ``image`` of JPEG/PNG bytes (base64 in JSON)
      and returning the top labels with probabilities, registered as ``<name>``, so
      ``mlflow models serve -m models:/<name>/<version>`` answers HTTP requests carrying images.
    """
    from pipeline.serving import DEFAULT_TOP_K, ImageClassifier, example_request

    labels = read_json(model_dir / "labels.json")
    requirements = [f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}", "pillow", "pandas"]
    mlflow.keras.log_model(
        model,
        name="model",
        signature=ModelSignature(
            inputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3), "image")]),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, len(labels)), "probabilities")]),
        ),
        # No input_example here: MLflow 3.17's keras flavor writes it before creating the model
        # folder (FileNotFoundError). The image_classifier model below carries one.
        registered_model_name=f"{registered_name}-keras" if registered_name else None,
        pip_requirements=requirements,
    )
    mlflow.pyfunc.log_model(
        name="image_classifier",
        python_model=ImageClassifier(),
        artifacts={"keras_model": str(model_dir / "model.keras"), "labels": str(model_dir / "labels.json")},
        code_paths=[str(Path(__file__).parent)],  # the pickled model refers to pipeline.serving
        signature=ModelSignature(
            inputs=Schema([ColSpec("binary", "image")]),
            outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                            ColSpec("string", "top_k")]),
            params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K)]),
        ),
        input_example=example_request(),
        registered_model_name=registered_name,
        pip_requirements=requirements,
    )


def record_run(run: mlflow.ActiveRun, out_dir: Path) -> None:
    """Write the run's id next to the model, so DVC outputs and the MLflow run find each other."""
    write_json(out_dir / RUN_FILE.name, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                         "tracking_uri": redact_url(mlflow.get_tracking_uri())})


def resume_recorded_run() -> mlflow.ActiveRun:
    recorded = read_json(RUN_FILE)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.start_run(run_id=recorded["run_id"])
