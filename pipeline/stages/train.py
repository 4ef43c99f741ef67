"""Stage 5, train: a new head on the cached features, then optional fine-tuning; one exported model.

Phase ``head``: the backbone is frozen, so the head (``model.head``) trains on ``data/features``,
one row per image and offline-augmented copy, computed once by the features stage. The linear head
(``dense_units: 0``, the default) is multinomial logistic regression on standardized features, a
convex problem: it is solved to its optimum by L-BFGS (``pipeline.model.linear_head``) at a path of
L2 strengths, the one with the lowest val log loss kept; the same head whatever the seed, in
seconds. An MLP head (``dense_units`` > 0) trains with Keras at a few L2 strengths
(``MLP_L2_GRID``), the one with the lowest val log loss kept. Either way the chosen strength stays
on the head's kernels through fine-tuning.
Phase ``fine_tune`` (``train.fine_tune.blocks`` or ``layers`` > 0) starts from that head: the top
of the backbone is unfrozen (BatchNorm layers excepted) and trained with the head at
``train.fine_tune.learning_rate``: on the frozen prefix's activations cached by the features stage
when there are some (``Config.activation_cut``: only the unfrozen top runs), else on the images of
``data/augmented``, offline variants included, through online augmentation layers when
``augment.mode`` is online or both.
Keras phases gather memory-mapped features and activations a batch at a time: datasets larger than
RAM stream from disk. The linear head's solver holds one float32 copy of the training features.

Keras phases (the MLP head's, fine-tuning): early stopping on val_loss keeping the best epoch,
``train.lr_schedule``, class weights, label smoothing, a stop with a clear message on a NaN loss,
16-bit compute (``model.precision``), and tf.distribute over all GPUs (or all workers under
TF_CONFIG) with per-replica batch sizes. Of these the linear head takes the class weights only.
Rows are numbered on from one phase to the next. After every epoch the training state is saved
(``pipeline.model.checkpoints``): a killed run rerun with ``dvc repro`` goes on from its last epoch
(the linear head, solved again, comes out the same).

On a cluster (``TF_CONFIG``) every worker runs this stage and trains its replicas in step; only the
chief writes the outputs below, the checkpoints and the MLflow run. The others start from the
chief's checkpoints (sent over), write nothing, and leave once the chief is done. A
worker that dies stops the others in one line; rerunning them all resumes from the last epoch.
A tracking server that stops answering ends the stage in one line after a bounded wait
(``tracking.HTTP_LIMITS``), the checkpoints kept: the rerun goes on from there.

Outputs in ``data/model/``: ``model.keras`` (raw uint8 images of any size -> class probabilities,
float32), without fine-tuning ``after_backbone.keras`` (its pooling and head: the backbone's
feature maps -> class probabilities, which evaluate scores the features stage's backbone outputs
with), ``labels.json`` and ``mlflow_run.json``; and ``eval/history.csv`` (phase, epoch, seconds,
metrics; the linear head: one row per L2 strength tried, ``l2`` its strength), kept in Git for
``dvc plots``.
The MLflow run (named after the DVC experiment, else ``<dataset>-params-<hash>``) gets every param,
the prepared data as dataset inputs (one per split), the per-epoch (per-strength) metrics
(fine-tuning ones prefixed ``finetune_``, at their epoch numbers), the chosen strength (``head_l2``),
system metrics (``mlflow.system_metrics``) and the model, registered with the alias ``@candidate``,
a description and the version's tags.

One seed, one model: Keras is seeded once MLflow's run has started (MLflow may use Python's global
random), so the same params, data and seed train the same model under ``dvc repro``, ``dvc exp
run``, after a resume, and against any tracking store.
"""

import contextlib
import csv
import hashlib
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import log_loss

from pipeline.cli import UserError, error_summary, redact_url, run_stage
from pipeline.config import Config, ModelParams, load_config
from pipeline.data.manifests import read_labels
from pipeline.files import atomic_dir, atomic_file
from pipeline.model import checkpoints, devices, feature_store, linear_head, networks
from pipeline.paths import (
    AFTER_BACKBONE_FILE,
    AUGMENTED_DIR,
    AUGMENTED_MANIFEST,
    CHECKPOINT_DIR,
    FEATURES_DIR,
    HISTORY,
    MODEL_DIR,
    MODEL_FILE,
    MODEL_LABELS,
)
from pipeline.report import metrics, tracking

# L2 strengths an MLP head (model.head.dense_units > 0) is trained at, strongest first: each a
# whole Keras training, so a decade apart (the linear head solves at linear_head.L2_GRID's).
MLP_L2_GRID = (1e-2, 1e-3, 1e-4, 1e-5)
PLATEAU_FACTOR = 0.2  # lr_schedule plateau: multiply the learning rate by this...
PLATEAU_PATIENCE = 2  # ...after this many epochs without val_loss progress
RESUME_ON_CLUSTER = (
    "start it and rerun the stage on every worker (dvc repro on the chief): "
    "training goes on from the chief's last checkpoint"
)


@dataclass(frozen=True)
class Role:
    """What this process writes: the chief of a cluster (or the only process) logs to MLflow and
    keeps the checkpoints in ``data/checkpoints``; another worker logs nothing and keeps them in a
    scratch folder, a copy of the chief's at the start."""

    logs_to_mlflow: bool
    checkpoints: Path


CHIEF = Role(logs_to_mlflow=True, checkpoints=CHECKPOINT_DIR)


@dataclass(frozen=True)
class Phase:
    name: str  # history.csv's phase column, and the checkpoint folder
    metric_prefix: str  # of its metrics in MLflow
    first_epoch: int  # epochs done before it: numbering goes on across phases
    epochs: int
    batch_size: int  # global: per replica times replicas
    learning_rate: float
    learning_rate_param: str  # named when the loss becomes NaN
    checkpoint: str = ""  # its folder in the checkpoints; "" = its name

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs


@dataclass(frozen=True)
class Examples:
    """One split: ``batches(indices, batch_size)`` turns a dataset of row indices into batches of
    (inputs, one-hot labels) with tf ops; ``labels`` are the class indices."""

    batches: Callable[[tf.data.Dataset, int], tf.data.Dataset]
    labels: np.ndarray

    @property
    def count(self) -> int:
        return len(self.labels)


# ---- data -------------------------------------------------------------------------------------


def row_examples(rows: np.ndarray, labels: np.ndarray, n_classes: int, bfloat16_bits: bool = False) -> Examples:
    """Batches gathered from ``rows`` (features or cached activations) by index, a batch per call:
    never the whole array in memory, no Python loop per example. 16-bit rows become float32;
    ``bfloat16_bits``: the rows are bfloat16 stored as their uint16 bit patterns."""
    one_hot = tf.constant(keras.utils.to_categorical(labels, n_classes))

    def gather(indices):
        x = tf.numpy_function(lambda i: rows[i], [indices], tf.as_dtype(rows.dtype), stateful=False)
        if bfloat16_bits:
            x = tf.bitcast(x, tf.bfloat16)
        x = tf.ensure_shape(tf.cast(x, "float32"), (None, *rows.shape[1:]))
        return x, tf.gather(one_hot, indices)

    return Examples(lambda indices, size: indices.batch(size).map(gather, num_parallel_calls=tf.data.AUTOTUNE), labels)


def activation_examples(split: str, cut: str, n_classes: int) -> Examples:
    """The split's activations at ``cut``, cached by the features stage (16-bit rows become float32)."""
    rows, bfloat16_bits = feature_store.activations(split, cut)
    return row_examples(rows, feature_store.labels(split), n_classes, bfloat16_bits)


def image_examples(split: str, n_classes: int, size: int) -> Examples:
    """The split's images in ``data/augmented`` (offline variants included), in the features' row order."""
    rows, labels = feature_store.manifest_rows(split), feature_store.labels(split)
    paths = tf.constant([str(AUGMENTED_DIR / r.path) for r in rows])
    one_hot = tf.constant(keras.utils.to_categorical(labels, n_classes))

    def example(i):
        image = tf.io.decode_jpeg(tf.io.read_file(tf.gather(paths, i)), channels=3)
        return tf.cast(tf.ensure_shape(image, (size, size, 3)), "float32"), tf.gather(one_hot, i)

    return Examples(
        lambda indices, batch_size: indices.map(example, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size), labels
    )


def shuffled_epochs(examples: Examples, batch_size: int, seed: int, epochs: range) -> tf.data.Dataset:
    """The batches of every epoch in ``epochs``, each epoch's order a function of (seed, epoch) alone,
    so that a resumed run sees exactly the batches an uninterrupted one would have."""

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(examples.count, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return examples.batches(tf.data.Dataset.from_tensor_slices(order), batch_size)

    epoch_numbers = tf.data.Dataset.from_tensor_slices(np.arange(epochs.start, epochs.stop, dtype="int64"))
    return epoch_numbers.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def in_order(examples: Examples, batch_size: int) -> tf.data.Dataset:
    return examples.batches(tf.data.Dataset.range(examples.count), batch_size).prefetch(tf.data.AUTOTUNE)


# ---- set-up -----------------------------------------------------------------------------------


def class_weights(labels: np.ndarray, n_classes: int, setting: str) -> dict[int, float] | None:
    """``auto``: n / (classes x count), inverse to the class frequency, so every class weighs the same in total."""
    if setting == "none":
        return None
    counts = np.bincount(labels, minlength=n_classes)
    return {c: len(labels) / (n_classes * max(count, 1)) for c, count in enumerate(counts.tolist())}


def resume_key(cfg: Config) -> str:
    """What checkpoints are valid for: the params that shape training and the content of the inputs."""
    params = cfg.model_dump(mode="json", include={"seed", "model", "augment", "train"})
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for path in [*sorted(FEATURES_DIR.iterdir()), AUGMENTED_MANIFEST]:
        with open(path, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def take_over(killed: dict | None, key: str, run_id: str) -> None:
    """Mark the MLflow run of a killed attempt as such; the run ``run_id`` now owns the checkpoints."""
    if killed:
        tracking.mark_killed(killed["mlflow_run_id"])
    checkpoints.claim(key, run_id)


# ---- one phase --------------------------------------------------------------------------------


class EpochStats(keras.callbacks.Callback):
    """Adds to each epoch's logs its ``seconds`` (wall time, validation included) and ``learning_rate``
    (Keras logs it only with ReduceLROnPlateau; here also for constant and cosine)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["seconds"] = time.perf_counter() - self.started
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class StopOnNaN(keras.callbacks.Callback):
    """Ends the stage at the first NaN or infinite loss, naming the learning rate, its usual cause."""

    def __init__(self, phase: Phase):
        super().__init__()
        self.phase = phase

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise UserError(
                f"the training loss became {loss} in epoch {self.epoch} ({self.phase.name} phase): "
                f"{self.phase.learning_rate_param}={self.phase.learning_rate:g} is probably too high; "
                "lower it"
            )


def compile_for(model: keras.Model, phase: Phase, steps_per_epoch: int, cfg: Config) -> None:
    learning_rate = phase.learning_rate
    if cfg.train.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, phase.epochs * steps_per_epoch)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.train.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def stopping_and_schedule(cfg: Config) -> list[keras.callbacks.Callback]:
    """Early stopping and the plateau schedule as ``train`` sets them (callbacks with state to checkpoint)."""
    stateful = []
    if cfg.train.early_stopping_patience:
        stateful.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=cfg.train.early_stopping_patience, restore_best_weights=True, verbose=1
            )
        )
    if cfg.train.lr_schedule == "plateau":
        stateful.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, verbose=1
            )
        )
    return stateful


def callbacks_for(
    phase: Phase, cfg: Config, role: Role
) -> tuple[list[keras.callbacks.Callback], checkpoints.EpochCheckpoint]:
    stateful = stopping_and_schedule(cfg)
    # After the others: saves what they did this epoch, before it is logged, so a tracking store that
    # stopped answering loses no epoch.
    checkpoint = checkpoints.EpochCheckpoint(phase.checkpoint or phase.name, stateful, role.checkpoints)
    logging = [tracking.log_epoch_metrics(phase.metric_prefix)] if role.logs_to_mlflow else []
    return [EpochStats(), StopOnNaN(phase), *stateful, checkpoint, *logging], checkpoint


def fit_phase(model: keras.Model, phase: Phase, train: Examples, val: Examples, cfg: Config, role: Role) -> list[dict]:
    """Train ``model`` through ``phase``, from where a killed run stopped if it left a checkpoint."""
    callbacks, checkpoint = callbacks_for(phase, cfg, role)
    steps_per_epoch = math.ceil(train.count / phase.batch_size)
    compile_for(model, phase, steps_per_epoch, cfg)
    checkpoint.restore_variables(model)
    start = checkpoint.epochs_done or phase.first_epoch
    end = start if checkpoint.stopped else phase.last_epoch
    if checkpoint.epochs_done:
        print(f"train: resuming the {phase.name} phase after epoch {start} (checkpoint in {CHECKPOINT_DIR})")
    if role.logs_to_mlflow and checkpoint.history:  # the killed run's epochs, into this run
        tracking.log_epochs(
            [({k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"])) for row in checkpoint.history],
            phase.metric_prefix,
        )
    model.fit(
        shuffled_epochs(train, phase.batch_size, cfg.seed, range(start, end)),
        validation_data=in_order(val, phase.batch_size),
        initial_epoch=start,
        epochs=end,  # start == end still runs on_train_end: early stopping puts its best weights back
        steps_per_epoch=steps_per_epoch,
        shuffle=False,  # shuffled_epochs did
        class_weight=class_weights(train.labels, model.output_shape[-1], cfg.train.class_weight),
        callbacks=callbacks,
        verbose=1 if sys.stdout.isatty() else 2,  # progress bars on a terminal, one line per epoch in logs
    )
    return [{"phase": phase.name, **row} for row in checkpoint.history]


# ---- the two phases and the exported model ------------------------------------------------------


def train_model(cfg: Config, n_classes: int, replicas: int, role: Role) -> tuple[keras.Model, list[dict]]:
    fine_tune = cfg.train.fine_tune
    # Without fine-tuning the backbone runs only in the exported model, which is float32: built
    # so at once, rather than in model.precision and then once more (seconds for a large backbone).
    with contextlib.nullcontext() if fine_tune.enabled else networks.dtype_policy("float32"):
        extractor = networks.saved_feature_extractor(cfg.model, FEATURES_DIR)
    base = networks.backbone_of(extractor)
    top_start = networks.trainable_top_start(base, cfg.model.spec, fine_tune) if fine_tune.enabled else None

    val = row_examples(feature_store.features("val"), feature_store.labels("val"), n_classes)
    head, history = train_head(cfg, n_classes, replicas, val, role)
    network, batch_size = head, cfg.train.batch_size * replicas
    if fine_tune.enabled:
        networks.unfreeze_top(base, cast(int, top_start))  # set when fine-tuning
        network, train, val = fine_tune_inputs(cfg, extractor, head, n_classes)
        batch_size = fine_tune.batch_size * replicas
        phase = Phase(
            "fine_tune",
            "finetune_",
            history[-1]["epoch"],
            fine_tune.epochs,
            batch_size,
            fine_tune.learning_rate,
            "train.fine_tune.learning_rate",
        )
        history += fit_phase(network, phase, train, val, cfg, role)
    if cfg.train.temperature_scaling:
        calibrate(head, network, val, batch_size, role)
    return exported(cfg.model, extractor, head), history


def train_head(cfg: Config, n_classes: int, replicas: int, val: Examples, role: Role) -> tuple[keras.Model, list[dict]]:
    """The head phase: the linear head solved (:func:`solved_head`), an MLP head trained
    (:func:`trained_mlp_head`); its model and history rows."""
    x_train, y_train = feature_store.features("train"), feature_store.labels("train")
    stats = networks.standardization(x_train)
    if not cfg.model.head.dense_units:
        return solved_head(cfg, stats, (x_train, y_train), (feature_store.features("val"), val.labels), n_classes, role)
    return trained_mlp_head(cfg, stats, row_examples(x_train, y_train, n_classes), val, n_classes, replicas, role)


def linear_head_model(
    cfg: Config,
    stats: networks.Standardization,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    n_classes: int,
) -> tuple[keras.Model, linear_head.Solution]:
    """The linear head at the optimum of its problem, its L2 strength chosen on the val split
    (``pipeline.model.linear_head``), and the path that chose it: the same whatever the seed."""
    (x_train, y_train), (x_val, y_val) = train, val
    solution = linear_head.regularization_path(
        linear_head.standardized(x_train, *stats),
        y_train,
        linear_head.standardized(x_val, *stats),
        y_val,
        n_classes,
        class_weights(y_train, n_classes, cfg.train.class_weight),
    )
    head = networks.head(stats, n_classes, cfg.model.head, l2=solution.chosen.l2)
    head.get_layer("probabilities").set_weights([solution.kernel, solution.bias])
    return head, solution


def solved_head(
    cfg: Config,
    stats: networks.Standardization,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    role: Role,
) -> tuple[keras.Model, list[dict]]:
    """:func:`linear_head_model`, with one history row per L2 strength of the path, numbered like
    epochs (``epoch``: fine-tuning's epochs are numbered on from the last), logged to MLflow alike."""
    head, solution = linear_head_model(cfg, stats, train, val, n_classes)
    rows: list[dict[str, Any]] = [
        {
            "phase": "head",
            "epoch": number,
            "l2": step.l2,
            "loss": step.loss,
            "accuracy": step.accuracy,
            "val_loss": step.val_loss,
            "val_accuracy": step.val_accuracy,
            "seconds": step.seconds,
        }
        for number, step in enumerate(solution.path, 1)
    ]
    if role.logs_to_mlflow:
        log_head_rows(rows, solution.chosen.l2)
    unconverged = [f"{step.l2:.3g}" for step in solution.path if not step.converged]
    edge = solution.chosen.l2 in (linear_head.L2_GRID[0], linear_head.L2_GRID[-1])
    print(
        f"train: head solved at {len(rows)} L2 strengths in {sum(r['seconds'] for r in rows):.2f} s, "
        f"l2={solution.chosen.l2:.3g} kept (val log loss {solution.chosen.val_loss:.4f}, "
        f"val_accuracy {solution.chosen.val_accuracy:.3f})"
        + (", the end of the grid: the best strength may lie beyond" if edge else "")
        + (f"; L-BFGS stopped at {linear_head.MAX_ITERATIONS} iterations for l2={unconverged}" if unconverged else "")
    )
    return head, rows


def trained_mlp_head(
    cfg: Config,
    stats: networks.Standardization,
    train: Examples,
    val: Examples,
    n_classes: int,
    replicas: int,
    role: Role,
) -> tuple[keras.Model, list[dict]]:
    """An MLP head trained with Keras once per L2 strength of ``MLP_L2_GRID`` (strongest first,
    early stopping on val_loss in each); the one with the lowest val log loss is kept, with its
    epochs as the history rows. The path ends at the first strength that does no better."""
    best: tuple[float, keras.Model, list[dict]] | None = None
    for l2 in MLP_L2_GRID:
        head = networks.head(stats, n_classes, cfg.model.head, l2=l2)
        phase = Phase(
            "head",
            f"head_l2_{l2:g}_",
            0,
            cfg.train.epochs,
            cfg.train.batch_size * replicas,
            cfg.train.learning_rate,
            "train.learning_rate",
            checkpoint=f"head-l2-{l2:g}",
        )
        rows = [{**row, "l2": l2} for row in fit_phase(head, phase, train, val, cfg, role)]
        val_loss = log_loss(
            val.labels, head.predict(in_order(val, phase.batch_size), verbose=0), labels=range(n_classes)
        )
        print(f"train: MLP head with l2={l2:g}: val log loss {val_loss:.4f}")
        if best is not None and val_loss >= best[0]:
            break
        best = (val_loss, head, rows)
    assert best is not None  # the grid is not empty: the first strength is always kept
    _, head, rows = best
    if role.logs_to_mlflow:
        log_head_rows(rows, rows[0]["l2"])
    return head, rows


def log_head_rows(rows: list[dict[str, Any]], l2: float) -> None:
    """The head phase's history rows (one per L2 strength or epoch) and the L2 strength kept, to MLflow."""
    tracking.log_epochs([({k: v for k, v in row.items() if k not in ("phase", "epoch")}, row["epoch"]) for row in rows])
    tracking.log_head_l2(l2)


def calibrate(head: keras.Model, network: keras.Model, val: Examples, batch_size: int, role: Role) -> None:
    """Temperature scaling: the temperature that best fits the trained ``network``'s val
    probabilities, folded into ``head``'s softmax layer (label smoothing leaves a model
    underconfident, a long head phase overconfident; accuracy stays as it is)."""
    temperature = metrics.fitted_temperature(val.labels, network.predict(in_order(val, batch_size), verbose=0))
    networks.fold_temperature(head, temperature)
    if role.logs_to_mlflow:
        tracking.log_temperature(temperature)
    print(f"train: temperature scaling on the val split: logits divided by {temperature:.3f}")


def fine_tune_inputs(
    cfg: Config, extractor: keras.Model, head: keras.Model, n_classes: int
) -> tuple[keras.Model, Examples, Examples]:
    """The model fine-tuning trains and its train and val examples: the unfrozen top on the cached
    activations when the features stage stored them, else the whole network on the images."""
    cut = cfg.activation_cut
    if cut:
        print(f"train: fine-tuning on the activations at {cut} cached by the features stage")
        return (
            networks.on_activations(extractor, head, cut),
            *(activation_examples(split, cut, n_classes) for split in ("train", "val")),
        )
    # Imported here: albumentations takes ~0.5 s to import, and a head-only run never needs it.
    from pipeline.data.augmentation import label_mixing, online_augmentation

    size = cfg.model.input_size
    augmentation = online_augmentation(cfg) if cfg.augment.mode in ("online", "both") else None
    train, val = (image_examples(split, n_classes, size) for split in ("train", "val"))
    train = replace(train, batches=label_mixing(cfg, train.batches))  # augment.online.mix, if any
    return networks.on_pixels(extractor, head, size, augmentation), train, val


def exported(params: ModelParams, extractor: keras.Model, head: keras.Model) -> keras.Model:
    """The deliverable, in float32 even after mixed-precision training (16-bit is slow on many CPUs).
    The head is float32 already; a mixed-precision extractor is rebuilt in float32 with its weights."""
    float32 = networks.in_float32(params, extractor)
    with networks.dtype_policy("float32"):  # the resize layer too
        return networks.classifier(float32, head, params.input_size)


def write_history(rows: list[dict], path: Path) -> None:
    names = list(dict.fromkeys(name for row in rows for name in row))  # phase, epoch, then metrics
    with atomic_file(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def history_summary(history: list[dict]) -> str:
    """Per phase: Keras epochs (time per epoch, the first one apart: it includes building the graph;
    the last val_accuracy) or the solved head's L2 strengths (their time, the kept one's val_accuracy)."""
    parts = []
    for phase in dict.fromkeys(row["phase"] for row in history):
        rows = [row for row in history if row["phase"] == phase]
        if "learning_rate" not in rows[0]:  # the linear head's path
            kept = min(rows, key=lambda row: row["val_loss"])
            parts.append(
                f"{phase} {len(rows)} L2 strengths ({sum(r['seconds'] for r in rows):.2f} s), "
                f"val_accuracy {kept['val_accuracy']:.3f} at l2={kept['l2']:.3g}"
            )
            continue
        timing = f"first {rows[0]['seconds']:.2f} s"
        if len(rows) > 1:
            timing += f", then median {statistics.median(r['seconds'] for r in rows[1:]):.2f} s/epoch"
        parts.append(f"{phase} {len(rows)} epochs ({timing}), last val_accuracy {rows[-1]['val_accuracy']:.3f}")
    return "; ".join(parts)


def main() -> None:
    cfg = load_config()
    feature_store.read_meta()  # stops in one line when the features stage has not run
    strategy = devices.distribution_strategy()  # first: MultiWorkerMirroredStrategy must come before other TF ops
    tf.config.experimental.enable_op_determinism()  # same seed on CPU -> same metrics
    policy = networks.use_precision(cfg.model)
    print(f"train: {devices.replicas_and_workers(strategy)}, backbone computes in {policy}")
    with devices.cluster_failures(RESUME_ON_CLUSTER):
        if devices.is_chief(strategy):
            train_and_write(cfg, strategy)
        else:
            train_in_step(cfg, strategy)


def train_and_write(cfg: Config, strategy: tf.distribute.Strategy) -> None:
    """The chief, or the only process: trains, writes the model and history, logs the MLflow run."""
    labels = read_labels(FEATURES_DIR / feature_store.LABELS)
    key = resume_key(cfg)
    killed = checkpoints.killed_attempt(key)
    devices.from_chief(strategy, checkpoints.packed())  # the other workers resume from the same epoch
    # Fails here, before any training, when a configured tracking server does not answer.
    with tracking.start_new_run(cfg.experiment_name, cfg.run_name, cfg.mlflow.system_metrics) as run:
        tracking.log_params(cfg.flat())
        tracking.log_datasets(cfg.dataset_name, cfg.data.url)
        take_over(killed, key, run.info.run_id)
        # Seeded here, after MLflow's start-up, right before the first layer is built: Keras draws
        # every default seed from Python's global random, which nothing may move in between (the
        # MLflow calls made while training keep it: tracking.keeps_global_random_state).
        keras.utils.set_random_seed(cfg.seed)
        with strategy.scope():
            model, history = train_model(cfg, len(labels), strategy.num_replicas_in_sync, CHIEF)
        with atomic_dir(MODEL_DIR) as out:
            model.save(out / MODEL_FILE.name)
            if not cfg.train.fine_tune.enabled:  # the backbone is the features stage's: its outputs are known
                lineage = networks.after_backbone_lineage(
                    out / MODEL_FILE.name, FEATURES_DIR / feature_store.BACKBONE_WEIGHTS
                )
                networks.after_backbone(model, lineage).save(out / AFTER_BACKBONE_FILE.name)
            shutil.copy(FEATURES_DIR / feature_store.LABELS, out / MODEL_LABELS.name)
        write_history(history, HISTORY)
        # The model is on disk before anything more goes to MLflow: a logging failure loses no
        # training (and the checkpoints stay, so a rerun only logs again).
        about = tracking.About(
            cfg.dataset_name, redact_url(cfg.data.url), f"{cfg.model.architecture} at {cfg.model.input_size} px"
        )
        try:
            logged = tracking.log_model(model, MODEL_DIR, cfg.registered_model_name, about)
        except Exception as err:  # MLflow raises many types (HTTP, database, artifact store)
            raise UserError(
                f"training finished and the model is in {MODEL_DIR}, but logging it to MLflow "
                f"failed ({error_summary(err)[:200]}); "
                "rerun dvc repro once the tracking store is back"
            ) from None
        tracking.record_run(run, logged, cfg.mlflow.system_metrics)
    checkpoints.remove()
    devices.barrier(strategy)  # the other workers leave now: a worker gone sooner reads as crashed to the rest
    print(
        f"train: {history_summary(history)}; model in {MODEL_DIR}, MLflow run '{run.info.run_name}' ({run.info.run_id})"
    )


def train_in_step(cfg: Config, strategy: tf.distribute.Strategy) -> None:
    """Another worker of a cluster: trains its replicas in step with the chief's, from the chief's
    checkpoints, writes nothing, and leaves once the chief has written everything."""
    n_classes = len(read_labels(FEATURES_DIR / feature_store.LABELS))
    with tempfile.TemporaryDirectory(prefix="worker-checkpoints-") as scratch:
        checkpoints.unpack(devices.from_chief(strategy, b""), Path(scratch))
        keras.utils.set_random_seed(cfg.seed)  # as the chief does, right before the first layer is built
        with strategy.scope():
            _, history = train_model(cfg, n_classes, strategy.num_replicas_in_sync, Role(False, Path(scratch)))
    devices.barrier(strategy)  # the chief's model, history and MLflow run are written
    print(f"train: {history_summary(history)}; the chief wrote the model and the MLflow run")


if __name__ == "__main__":
    run_stage(main)
