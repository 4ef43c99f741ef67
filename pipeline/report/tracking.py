"""The one module that talks to MLflow for the stages: where runs go, which run a pipeline run is,
and what each stage logs, loads or looks up there (``serving.py``, the served model, is MLflow's own).

By default runs go to a local SQLite store, ``mlflow.db`` in the project root, with artifacts in
``mlartifacts/`` beside it (``make ui`` shows them). The project root is DVC's ``DVC_ROOT``, which
DVC points at the main workspace even for queued experiments that run in a temporary copy, so
``dvc exp run --queue`` runs land in the same store. ``MLFLOW_TRACKING_URI`` points everything at
another store, e.g. a team's ``mlflow server``.

One pipeline run is one MLflow run, named after its DVC experiment (``<dataset>-params-<hash>``
outside one): ``train`` starts it, logs the data as dataset inputs and the model, and records the
run and the model versions in ``data/model/mlflow_run.json`` (a DVC output); ``evaluate`` reopens
the run to add test metrics (on the models too) and plots, and moves the registry alias
``@champion`` to the run's versions when they pass its gate and beat the champion on the same data.
"""

import contextlib
import functools
import hashlib
import os
import random
import re
import subprocess
import sys
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import keras
import mlflow
import numpy as np
import pandas as pd
import requests
import tensorflow as tf
from mlflow.entities import Metric
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.time import get_current_time_millis

from pipeline.cli import UserError, error_summary, redact_url
from pipeline.config import CHAMPION_METRICS, flatten, load_config
from pipeline.files import exclusive, read_json, write_json
from pipeline.model import networks
from pipeline.paths import CHECKPOINT_DIR, DOWNLOAD_REPORT, MLFLOW_RUN_FILE, MODEL_LABELS, PREPARED_MANIFEST, SPLITS
from pipeline.report import mlflow_ui

# Per-class metric keys (test_per_class_<key>_recall). MLflow takes letters, digits, _ - . space : /
# in a metric key, at most 250 characters (mlflow.utils.validation); a class name is any folder name.
CLASS_KEY_LENGTH = 100  # leaves room for test_per_class_..._precision within MLflow's 250
KEY_CHARACTERS = "A-Za-z0-9_-"  # of those MLflow takes; "." is kept to mark a changed name
PLAIN_CLASS_KEY = re.compile(f"[{KEY_CHARACTERS}]{{1,{CLASS_KEY_LENGTH}}}")  # such a name is its own key
NOT_KEY_CHARACTER = re.compile(f"[^{KEY_CHARACTERS}]")
# Artifact folders of a run: evaluate's plots, and its reports (metrics, predictions, ...).
PLOTS_ARTIFACTS, REPORTS_ARTIFACTS = "plots", "reports"
CLASS_KEYS_ARTIFACT = f"{REPORTS_ARTIFACTS}/class_keys.json"  # per-class key -> class name, logged with the metrics
# MLflow's experiment kind, a tag: the experiment is model training ("Machine learning" in the UI),
# not a GenAI app, whose pages (traces, sessions) MLflow 3 opens by default.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# MLflow's HTTP client, unless these are set: 3 retries, 2, 4, 8 s apart, 15 s per try at most, so a
# server gone (refused connections) fails a call in ~15 s and one that hangs in ~75 s. MLflow's own
# defaults (7 retries up to 120 s apart, 120 s per try) kept training waiting for a dead server for
# many minutes per call, each epoch logging one.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
# Registry aliases, on both registered models: the newest trained version, and the best evaluated
# one on the same data (mlflow.champion_metric), the one make serve serves.
CANDIDATE, CHAMPION = "candidate", "champion"
DATA_HASH_TAG = "data.manifest_sha256"  # the prepared data (files, labels, splits): same hash, same test images
COUNT_TAGS = {"top_k": "test_top_k", "test_images": "test_images"}  # counts of metrics.json -> the run's tags
CLASSES_SHOWN = 1000  # characters of class names in a version's tag and the registered model's description


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


def use_project_store() -> str:
    """Point MLflow at the store of :func:`tracking_uri`; returns its URI to show (credentials masked).
    With a tracking server, MLflow's HTTP retries are bounded (HTTP_LIMITS) unless set already."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_LIMITS.items():
            os.environ.setdefault(name, value)
    create_tables(uri)
    return redact_url(uri)


@functools.cache  # once per process and store
def create_tables(uri: str) -> None:
    """Open a SQLite store, creating its tables if it has none, one process at a time. MLflow 3.17
    creates them (alembic migrations) when a process first opens an empty database, unguarded: two
    processes doing so at once, as parallel queued experiments on a new project do, fail with
    alembic's "Online migration expected to match one row". Under a lock beside the database, the
    first creates them; the others wait, then find them."""
    if not uri.startswith("sqlite:///"):
        return  # a server creates its own store's tables, once, when it starts
    database = Path(uri.removeprefix("sqlite:///"))
    with exclusive(
        database.with_name(f"{database.name}.lock"), f"MLflow: waiting for another process setting up {database}"
    ):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # opens the store: creates its tables


def loggable_params(params: dict[str, Any]) -> dict[str, Any]:
    """Params safe to log: credentials stripped from URLs (the strict config has no secret keys)."""
    return {key: redact_url(value) if isinstance(value, str) else value for key, value in params.items()}


def log_params(params: dict[str, Any]) -> None:
    """The flat params (``model.backbone``, ...) as the active run's params, see :func:`loggable_params`."""
    mlflow.log_params(loggable_params(params))


def dvc_experiment() -> str | None:
    """The DVC experiment this process runs in (DVC sets ``DVC_EXP_NAME`` for ``dvc exp run``,
    queued or not); None under ``dvc repro``."""
    return os.environ.get("DVC_EXP_NAME") or None


@contextlib.contextmanager
def start_new_run(experiment_name: str, run_name: str, system_metrics: bool) -> Iterator[mlflow.ActiveRun]:
    """A new run in ``experiment_name`` (a model-training experiment), named after the DVC experiment
    when there is one, else ``run_name`` (never a name MLflow draws from Python's global ``random``,
    which would move the training seeds); ``system_metrics``: MLflow samples CPU, memory, disk,
    network (and NVIDIA GPUs when ``nvidia-ml-py`` is installed) every 10 s into ``system/*``
    metrics while the run is open."""
    check_reachable()
    use_project_store()
    experiment = mlflow.get_experiment_by_name(experiment_name) or created_experiment(experiment_name)
    experiment_id = experiment.experiment_id
    for key, value in experiment_tags().items():
        if key not in experiment.tags:  # made before this tag was set; a kind or view set by hand stays
            mlflow.MlflowClient().set_experiment_tag(experiment_id, key, value)
    with ended(
        mlflow.start_run(
            experiment_id=experiment_id,
            run_name=dvc_experiment() or run_name,
            tags=lineage_tags(),
            log_system_metrics=system_metrics,
        )
    ) as run:
        yield run


@contextlib.contextmanager
def ended(run: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """``run`` ends FINISHED after the block, FAILED when the block fails; ending a failed run is
    tried once (within HTTP_LIMITS), so a store that stopped answering does not hide why the block
    failed (a rerun marks a run left RUNNING as KILLED: train's take_over)."""
    try:
        yield run
    except BaseException:
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        raise
    mlflow.end_run()


def created_experiment(name: str) -> mlflow.entities.Experiment:
    """A new model-training experiment ``name``, or the one a parallel run created a moment ago."""
    try:
        mlflow.create_experiment(name, artifact_location=artifact_location(tracking_uri()), tags=experiment_tags())
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return cast(mlflow.entities.Experiment, mlflow.get_experiment_by_name(name))  # created above, or just before


def experiment_tags() -> dict[str, str]:
    """A model-training experiment (KIND_TAG) whose runs the UI lists with their test scores (mlflow_ui)."""
    return {KIND_TAG: MODEL_TRAINING, mlflow_ui.VIEW_TAG: mlflow_ui.view_tag_value()}


def mark_killed(run_id: str) -> None:
    """End the run of a killed training attempt as ``KILLED`` if the store still has it running."""
    client = mlflow.MlflowClient()
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # e.g. another tracking store now
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")


def training_runs_url(ui_url: str, experiment_name: str) -> str:
    """The MLflow UI's page of the experiment's runs, with their test scores (mlflow_ui.runs_url)."""
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return mlflow_ui.runs_url(ui_url, None)
    return mlflow_ui.runs_url(ui_url, experiment.experiment_id, saved_view=mlflow_ui.VIEW_TAG in experiment.tags)


def lineage_tags() -> dict[str, str]:
    """Tags that tie the run to its code (git commit), DVC experiment and data."""
    tags = {}
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git_head()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    experiment = dvc_experiment()
    if experiment:
        tags["dvc.experiment"] = experiment
    if PREPARED_MANIFEST.is_file():  # files, labels and split of every image: one hash for "the data"
        tags[DATA_HASH_TAG] = hashlib.sha256(PREPARED_MANIFEST.read_bytes()).hexdigest()
    archive_sha256 = read_json(DOWNLOAD_REPORT).get("sha256") if DOWNLOAD_REPORT.is_file() else None
    if archive_sha256:  # null for a local folder source
        tags["data.archive_sha256"] = archive_sha256
    return tags


def _git_head() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or None


def log_datasets(dataset_name: str, url: str) -> None:
    """The prepared manifest as the run's dataset inputs, one per split (context ``train``, ``val``,
    ``test``): its rows of that split (path, label, sha256, ...), named after the dataset, with
    ``data.url`` (credentials masked) as source and a digest of the rows. The UI's Dataset column
    shows them and its Datasets filter picks runs by them."""
    if not PREPARED_MANIFEST.is_file():
        return
    rows = pd.read_csv(PREPARED_MANIFEST, dtype=str, keep_default_na=False)  # labels stay text ("001", "NA")
    for split in SPLITS:
        split_rows = rows[rows["split"] == split].reset_index(drop=True)
        if split_rows.empty:
            continue
        with warnings.catch_warnings():
            # MLflow 3.17 registers its local-file source twice, then warns that a path fits both.
            warnings.filterwarnings(
                "ignore", message="The specified dataset source can be interpreted in multiple ways"
            )
            dataset = mlflow.data.from_pandas(  # type: ignore[attr-defined]  # registered at import time
                split_rows, source=redact_url(url), name=dataset_name, targets="label"
            )
        mlflow.log_input(dataset, context=split)


def logged_dataset(run_id: str, context: str) -> mlflow.entities.Dataset | None:
    """The run's dataset input logged with ``context`` (see :func:`log_datasets`), if any."""
    inputs = mlflow.get_run(run_id).inputs.dataset_inputs  # type: ignore[union-attr]  # a fetched run has inputs
    return next(
        (i.dataset for i in inputs if any(t.key == MLFLOW_DATASET_CONTEXT and t.value == context for t in i.tags)), None
    )


def keeps_global_random_state(function: Callable) -> Callable:
    """Run ``function`` (an MLflow call made while training) with Python's and NumPy's global random
    states put back afterwards: Keras draws the seeds of layers it builds later (fine-tuning's) from
    Python's, so nothing logged may move them."""

    @functools.wraps(function)
    def kept(*args, **kwargs):
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            return function(*args, **kwargs)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    return kept


def log_epoch_metrics(prefix: str = "") -> keras.callbacks.Callback:
    """A Keras callback logging each epoch's metrics (loss, accuracy, val_*) to the active run."""
    return keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: log_epoch(logs, epoch + 1, prefix))


def log_epoch(logs: dict[str, float], epoch: int, prefix: str = "") -> None:
    """One epoch's metrics, each name with ``prefix``, at step ``epoch`` (counted from 1)."""
    log_epochs([(logs, epoch)], prefix)


@keeps_global_random_state
def log_epochs(epochs: Sequence[tuple[dict[str, float], int]], prefix: str = "") -> None:
    """Several epochs' metrics (``(metrics, epoch)`` pairs) in one request, not one per epoch. A
    store that no longer answers (after HTTP_LIMITS' retries) ends training with a UserError saying so."""
    run_id, now = mlflow.active_run().info.run_id, get_current_time_millis()  # type: ignore[union-attr]
    metrics = [
        Metric(f"{prefix}{key}", float(value), now, epoch, run_id=run_id)
        for logs, epoch in epochs
        for key, value in logs.items()
    ]
    try:
        mlflow.MlflowClient().log_batch(run_id, metrics=metrics)
    except Exception as err:  # MLflow raises many types (HTTP, database)
        epoch = epochs[-1][1]
        raise UserError(
            f"the MLflow tracking store {redact_url(tracking_uri())} stopped answering in epoch {epoch} "
            f"({error_summary(err)[:200]}); training stopped with its checkpoints kept in "
            f"{CHECKPOINT_DIR}: rerun dvc repro once the store answers, and training goes on after "
            f"epoch {epoch}"
        ) from None


def log_head_l2(l2: float) -> None:
    """The L2 strength the head phase chose on the val split, as metric ``head_l2``."""
    mlflow.log_metric("head_l2", l2)


@keeps_global_random_state
def log_temperature(temperature: float) -> None:
    """The temperature that train's temperature scaling divides the logits by, as metric ``temperature``."""
    mlflow.log_metric("temperature", temperature)


def class_keys(labels: list[str]) -> list[str]:
    """One metric-key part per class, valid in MLflow and unique: the name itself when it is plain
    (ASCII letters, digits, ``_``, ``-``; at most 100 characters), else the name in ASCII with every
    other character as ``_``, cut to 100, plus ``.`` and the class index: ``Ünïcode, cats`` (class 0)
    -> ``Unicode__cats.0``, ``a b`` (class 3) -> ``a_b.3`` beside a class ``a_b``. Plain names have
    no ``.`` and the indices differ, so no two keys are the same."""
    return [
        label if PLAIN_CLASS_KEY.fullmatch(label) else f"{_ascii_key(label)}.{index}"
        for index, label in enumerate(labels)
    ]


def _ascii_key(name: str) -> str:
    letters = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))  # Ü -> U
    return NOT_KEY_CHARACTER.sub("_", letters)[:CLASS_KEY_LENGTH]


def log_test_metrics(
    report: dict, model_ids: Sequence[str | None] = (), dataset: mlflow.entities.Dataset | None = None
) -> None:
    """The scores of ``eval/metrics.json`` as metrics of the active run, and of each logged model
    in ``model_ids`` (the UI's Models tab compares them), measured on ``dataset``: ``test_`` and
    their path joined by ``_`` (``test_accuracy``, ``test_accuracy_ci95_low``, ``test_macro_f1``,
    ``test_per_class_<key>_recall`` with the keys of :func:`class_keys`), and the class names of
    those keys as ``reports/class_keys.json``. Counts are no metrics: k and the number of test
    images become the run's tags ``test_top_k`` and ``test_images``; per-class supports stay in
    ``metrics.json``."""
    names = list(report["per_class"])
    keys = class_keys(names)
    per_class = {
        key: {k: v for k, v in scores.items() if k != "support"}
        for key, scores in zip(keys, report["per_class"].values(), strict=True)
    }
    scores = {k: v for k, v in report.items() if k not in COUNT_TAGS}
    metrics = flatten({**scores, "per_class": per_class}, separator="_", prefix="test_")
    for model_id in model_ids or [None]:  # None: the run's alone
        mlflow.log_metrics(metrics, model_id=model_id, dataset=dataset)
    mlflow.set_tags({tag: report[key] for key, tag in COUNT_TAGS.items()})
    mlflow.log_dict(dict(zip(keys, names, strict=True)), CLASS_KEYS_ARTIFACT)


def log_plots(folder: Path) -> None:
    """Every file in ``folder`` as an artifact of the active run, under ``plots/``."""
    mlflow.log_artifacts(str(folder), artifact_path=PLOTS_ARTIFACTS)


def log_reports(paths: Sequence[Path]) -> None:
    """Each file of ``paths`` that exists as an artifact of the active run, under ``reports/``."""
    for path in paths:
        if path.is_file():
            mlflow.log_artifact(str(path), artifact_path=REPORTS_ARTIFACTS)


@dataclass(frozen=True)
class About:
    """What the registry pages say of a trained model besides its classes."""

    dataset: str  # the dataset's name (Config.dataset_name)
    source: str  # data.url, credentials masked
    backbone: str  # as built, e.g. "mobilenet alpha 0.25 at 128 px"


def log_model(model: keras.Model, model_dir: Path, registered_name: str | None, about: About) -> dict[str, dict]:
    """Log the trained model as two MLflow models that share one copy of the weights, register each
    (unless ``registered_name`` is None) with the alias ``@candidate``, a description of the
    registered model (:func:`descriptions`) and the version's tags (:func:`version_tags`), and
    return, per model, its ``model_id``, ``registered_model`` and ``version``.

    - ``model``: the ``mlflow.keras`` flavor, the weights: uint8 batches ``(n, h, w, 3)`` ->
      probabilities, registered as ``<name>-keras``; the class names are in its metadata (``labels``).
    - ``image_classifier``: ``pipeline/serving.py`` as a model from code, taking a column ``image``
      of JPEG/PNG bytes (base64 in JSON) and returning the top labels with probabilities,
      registered as ``<name>``, so ``mlflow models serve -m models:/<name>@champion`` answers HTTP
      requests carrying images. It names the Keras model by URI rather than holding a second copy.
    """
    from pipeline import serving

    labels = read_json(model_dir / MODEL_LABELS.name)
    requirements = [f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}", "pillow", "pandas"]
    weights = mlflow.keras.log_model(
        model,
        name="model",
        signature=ModelSignature(
            inputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3), "image")]),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, len(labels)), "probabilities")]),
        ),
        # No input_example here: MLflow 3.17's keras flavor writes it before creating the model
        # folder (FileNotFoundError). The image_classifier model below carries one.
        metadata={"labels": labels},
        registered_model_name=f"{registered_name}-keras" if registered_name else None,
        pip_requirements=requirements,
    )
    # MLflow predicts the input example with the logged model, loaded: the Keras model is this one,
    # unless it belongs to a cluster's workers (its prediction would wait for theirs: a fresh copy).
    clustered = isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy)
    with contextlib.nullcontext() if clustered else networks.logging_as(weights.model_uri, model):
        classifier = mlflow.pyfunc.log_model(
            name="image_classifier",
            python_model=serving.__file__,
            model_config={"keras_model": weights.model_uri, "labels": labels},
            code_paths=[
                str(Path(__file__).parents[1])
            ],  # the pipeline package: serving.py imports pipeline.data.images, pipeline.cli
            signature=serving.SIGNATURE,
            input_example=serving.example_request(),
            registered_model_name=registered_name,
            pip_requirements=requirements,
        )
    models = {
        "model": registered(weights, f"{registered_name}-keras" if registered_name else None),
        "image_classifier": registered(classifier, registered_name),
    }
    if registered_name:
        client = mlflow.MlflowClient()
        for kind, description in descriptions(registered_name, about, labels).items():
            client.update_registered_model(models[kind]["registered_model"], description=description)
        tag_versions(models, version_tags(about, labels))
    return models


def registered(info: ModelInfo, name: str | None) -> dict:
    """What mlflow_run.json records of a logged model; its registered version becomes ``@candidate``."""
    version = info.registered_model_version
    if name:
        mlflow.MlflowClient().set_registered_model_alias(name, CANDIDATE, str(version))
    return {"model_id": info.model_id, "registered_model": name, "version": version}


def class_list(labels: list[str]) -> str:
    """The class names for a page: comma-separated, cut at CLASSES_SHOWN characters."""
    text = ", ".join(labels)
    return text if len(text) <= CLASSES_SHOWN else f"{text[:CLASSES_SHOWN]}... ({len(labels)} classes)"


def descriptions(name: str, about: About, labels: list[str]) -> dict[str, str]:
    """The registry page of each of a run's two registered models: what it classifies, from which
    data, how to serve or load it, and why there are two (kind as in mlflow_run.json)."""
    what = (
        f"Classifies photos into {len(labels)} classes ({class_list(labels)}): a new head on an image "
        f"backbone (each version's backbone tag), trained on the dataset {about.dataset} ({about.source}). Aliases: @champion is "
        "the version `make serve` serves, the best on the test data by mlflow.champion_metric (`make promote "
        "EXP=<experiment>` picks another); @candidate is the newest trained version. Each version's tags "
        "give its test accuracy with a 95 % interval, data hash, classes, backbone and DVC experiment."
    )
    return {
        "image_classifier": f"{what}\n\nThis is the model to serve: image bytes in, labels out. `make serve` runs "
        f"`mlflow models serve -m models:/{name}@champion`; POST base64 JPEG/PNG files as "
        '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}} to '
        f"/invocations. It holds no weights: it loads those of {name}-keras of the same run.",
        "model": f"{what}\n\nThe Keras weights behind {name} (serve that one): uint8 image batches "
        "(n, height, width, 3) of any size in, class probabilities out, class names in the metadata "
        f'`labels`. For Python: `mlflow.keras.load_model("models:/{name}-keras@champion")` or '
        f'`make predict PATHS=photo.jpg ARGS="--model models:/{name}-keras@champion"`.',
    }


def version_tags(about: About, labels: list[str]) -> dict[str, str]:
    """Tags of a run's registered versions, for choosing one on the registry page."""
    tags = {
        "dataset": about.dataset,
        "data.source": about.source,
        "classes": class_list(labels),
        "backbone": about.backbone,
        "dvc.experiment": dvc_experiment() or "none (dvc repro)",
    }
    data_hash = lineage_tags().get(DATA_HASH_TAG)
    if data_hash:
        tags[DATA_HASH_TAG] = data_hash
    return tags


def tag_versions(models: dict[str, dict], tags: dict[str, str]) -> None:
    """Set ``tags`` on each registered version of ``models`` (as recorded in mlflow_run.json)."""
    client = mlflow.MlflowClient()
    for model in models.values():
        if model["registered_model"]:
            for key, value in tags.items():
                client.set_model_version_tag(model["registered_model"], str(model["version"]), key, value)


def scored_tags(report: dict) -> dict[str, str]:
    """The version tags evaluate adds: each headline metric with its 95 % interval and the image count."""
    n = report["test_images"]
    return {
        f"test_{name}": f"{value:.4f} (95 % interval {interval['low']:.4f}-{interval['high']:.4f}, {n} test images)"
        for name, value, interval in (
            ("accuracy", report["accuracy"], report["accuracy_ci95"]),
            ("macro_f1", report["macro"]["f1"], report["macro_f1_ci95"]),
        )
    }


def champion_stays(recorded: dict, report: dict, metric: str) -> str | None:
    """Why ``@champion`` stays where it is rather than move to the recorded run's versions, in a few
    words; None when it moves: there is no champion yet, it is this run's already, or this run beats
    it on the test ``metric`` (one of CHAMPION_METRICS; a tie goes to the lower log loss), measured
    on the same prepared data (scores on other images, or other splits, say nothing of which is better)."""
    name = servable(recorded)
    if name is None:
        return None
    client = mlflow.MlflowClient()
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no champion yet
        return None
    if champion.run_id is None or champion.run_id == recorded["run_id"]:  # None: registered by hand, no run
        return None
    theirs, ours = client.get_run(champion.run_id).data, client.get_run(recorded["run_id"]).data
    if theirs.tags.get(DATA_HASH_TAG) != ours.tags.get(DATA_HASH_TAG):
        return (
            f"@champion (version {champion.version}) was tested on other data (prepared data "
            f"{str(theirs.tags.get(DATA_HASH_TAG))[:8]}, this run's {str(ours.tags.get(DATA_HASH_TAG))[:8]})"
        )
    flat = flatten(report, separator="_")
    score, their_score = flat[metric], theirs.metrics.get(f"test_{metric}")
    if their_score is None:
        return f"@champion (version {champion.version}) has no test_{metric} to compare with"
    sign = 1 if CHAMPION_METRICS[metric] else -1
    if sign * score > sign * their_score or (
        score == their_score and flat["log_loss"] < theirs.metrics.get("test_log_loss", np.inf)
    ):
        return None
    tie = (
        f" and log loss {theirs.metrics.get('test_log_loss', np.nan):.4f} vs {flat['log_loss']:.4f}"
        if score == their_score
        else ""
    )
    return (
        f"@champion (version {champion.version}) scores test {metric} {their_score:.4f} vs this run's "
        f"{score:.4f}{tie} on the same test data"
    )


def servable(recorded: dict) -> str | None:
    """The registered model that decides for both of a run's models: the served one (else the Keras one)."""
    return next(
        (
            recorded["models"][kind]["registered_model"]
            for kind in ("image_classifier", "model")
            if recorded["models"].get(kind, {}).get("registered_model")
        ),
        None,
    )


def promote(recorded: dict) -> list[str]:
    """Point ``@champion`` at the recorded run's registered versions; returns their URIs."""
    client = mlflow.MlflowClient()
    promoted = []
    for model in recorded["models"].values():
        if model["registered_model"]:
            client.set_registered_model_alias(model["registered_model"], CHAMPION, str(model["version"]))
            promoted.append(f"models:/{model['registered_model']}/{model['version']}")
    return promoted


def record_run(run: mlflow.ActiveRun, models: dict[str, dict], system_metrics: bool) -> None:
    """Write the run's id and its models next to the model, so DVC outputs and the MLflow run find
    each other, and evaluate resumes the run as train ran it."""
    write_json(
        MLFLOW_RUN_FILE,
        {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": redact_url(mlflow.get_tracking_uri()),
            "system_metrics": system_metrics,
            "models": models,
        },
    )


def recorded_run() -> dict:
    return read_json(MLFLOW_RUN_FILE)


@contextlib.contextmanager
def resume_run(recorded: dict) -> Iterator[mlflow.ActiveRun]:
    """The recorded run, active for the block (see :func:`ended`); a server that does not answer is
    reported in one line first."""
    check_reachable()
    use_project_store()
    with ended(mlflow.start_run(run_id=recorded["run_id"], log_system_metrics=recorded["system_metrics"])) as run:
        yield run


def logged_model_info(uri: str) -> ModelInfo:
    """What the project's store knows of the logged model at ``uri``: flavors, metadata, run id.
    Raises MLflow's errors (MlflowException, OSError, ...) for a URI it cannot resolve."""
    use_project_store()
    return mlflow.models.get_model_info(uri)


def load_keras_model(uri: str) -> keras.Model:
    """The Keras model of the logged model at ``uri`` (its ``keras`` flavor, see :func:`logged_model_info`)."""
    from pipeline import serving

    return serving.load_keras_model(uri)


def finished_runs(experiment_name: str, metric: str, max_runs: int) -> pd.DataFrame | None:
    """The experiment's finished runs, best ``metric`` first, at most ``max_runs``, as MLflow's
    search table (``tags.mlflow.runName``, ``metrics.<name>``, ``params.<name>``, ``run_id``, ...);
    None when the store has no such experiment."""
    if mlflow.get_experiment_by_name(experiment_name) is None:
        return None
    return mlflow.search_runs(
        experiment_names=[experiment_name],
        order_by=[f"metrics.{metric} DESC"],
        max_results=max_runs,
        filter_string="attributes.status = 'FINISHED'",
    )


if __name__ == "__main__":  # `python -m pipeline.report.tracking http://127.0.0.1:5000`: the link make ui prints
    use_project_store()
    print(training_runs_url(sys.argv[1], load_config().experiment_name))
