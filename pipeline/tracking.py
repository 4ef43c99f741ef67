"""MLflow set-up shared by the stages that log: where runs go and which run a pipeline run is.

By default runs go to a local SQLite store, ``mlflow.db`` in the project root, with artifacts in
``mlartifacts/`` (``make ui`` shows them). ``MLFLOW_TRACKING_URI`` points everything at another
store, e.g. a team's ``mlflow server``.
"""

import os
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.files import read_json, write_json

LOCAL_DB = Path("mlflow.db")
LOCAL_ARTIFACTS = Path("mlartifacts")
RUN_FILE = Path("data/model/mlflow_run.json")  # written by train, read by evaluate


def use_tracking_store() -> bool:
    """Point MLflow at the configured store; True when that is the default local one."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri exports it
    mlflow.set_tracking_uri(configured or f"sqlite:///{LOCAL_DB.resolve()}")
    return not configured


def start_new_run(experiment_name: str) -> mlflow.ActiveRun:
    """A new run in ``experiment_name``, named after the DVC experiment when there is one."""
    local = use_tracking_store()
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        # The local store keeps artifacts beside it, not in a folder relative to the working dir.
        artifact_location = LOCAL_ARTIFACTS.resolve().as_uri() if local else None
        experiment_id = mlflow.create_experiment(experiment_name, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
    return mlflow.start_run(experiment_id=experiment_id, run_name=os.environ.get("DVC_EXP_NAME"))


def log_epoch_metrics(prefix: str = "") -> keras.callbacks.Callback:
    """A Keras callback logging each epoch's metrics (loss, accuracy, val_*) to the active run."""
    return keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in logs.items()},
                                                             step=epoch + 1)
    )


def log_model(model: keras.Model, n_classes: int, registered_name: str | None) -> None:
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, n_classes), "probabilities")]),
    )
    mlflow.keras.log_model(
        model,
        name="model",
        signature=signature,
        # No input_example: MLflow 3.17's keras flavor writes it before creating the model folder
        # (FileNotFoundError); the signature documents the input.
        registered_model_name=registered_name,
        pip_requirements=[f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}"],
    )


def record_run(run: mlflow.ActiveRun, out_dir: Path) -> None:
    """Write the run's id next to the model, so DVC outputs and the MLflow run find each other."""
    write_json(out_dir / RUN_FILE.name, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                         "tracking_uri": mlflow.get_tracking_uri()})


def resume_recorded_run() -> mlflow.ActiveRun:
    recorded = read_json(RUN_FILE)
    use_tracking_store()
    return mlflow.start_run(run_id=recorded["run_id"])
