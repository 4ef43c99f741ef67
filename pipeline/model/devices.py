"""Where the backbone runs: one ``tf.distribute`` strategy for the features and train stages.

All visible GPUs of the machine (``MirroredStrategy``), or, with ``TF_CONFIG`` set, every worker of
a cluster (``MultiWorkerMirroredStrategy``: each worker runs the same stage with the same params and
data; collectives over the network keep them in step). Only the chief writes the stage's outputs;
what the others need of its files (a killed run's checkpoints) it sends them (:func:`from_chief`).
A worker that dies or cannot be reached ends the stage on every other worker in one line
(:func:`cluster_failures`).
"""

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer

from pipeline.cli import UserError
from pipeline.files import atomic_dir

# What TensorFlow raises on the other workers when one of a cluster dies or cannot be reached.
PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
)


def distribution_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored under TF_CONFIG; else mirrored over all GPUs, or over the logical CPU
    devices when the CPU was split into several (how the tests run it); else the default strategy.
    Create it before any other TensorFlow op: MultiWorkerMirroredStrategy must configure the runtime."""
    if os.environ.get("TF_CONFIG"):
        fit_on_several_workers()
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def workers(strategy: tf.distribute.Strategy) -> int:
    """How many machines (TF_CONFIG's chief and worker tasks) the strategy spans; 1 without a cluster."""
    if strategy.cluster_resolver is None:
        return 1
    jobs = strategy.cluster_resolver.cluster_spec().as_dict()
    return len(jobs.get("chief", [])) + len(jobs.get("worker", []))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """The one process that writes outputs: the ``chief`` task, else worker 0, else the only process."""
    resolver = strategy.cluster_resolver
    if resolver is None or resolver.task_type is None:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker" and resolver.task_id == 0)


@contextlib.contextmanager
def output_dir(strategy: tf.distribute.Strategy, final: Path) -> Iterator[Path]:
    """``files.atomic_dir(final)`` on the chief; on the other workers a scratch folder, deleted after:
    they compute what the chief writes (collectives need every worker) without a copy of their own.
    Every worker leaves it once the chief's ``final`` is in place, so that a worker's next stage
    on a shared project folder reads the chief's outputs, never older ones."""
    if is_chief(strategy):
        with atomic_dir(final) as out:
            yield out
    else:
        with tempfile.TemporaryDirectory(prefix="worker-") as scratch:
            yield Path(scratch)
    barrier(strategy)


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Returns once every worker of the cluster has called it (at once without one): one tiny
    all-reduce, in a graph (eager, TensorFlow warns of overhead)."""
    if workers(strategy) == 1:
        return

    def add_one() -> tf.Tensor:
        return tf.distribute.get_replica_context().all_reduce("SUM", tf.ones(()))

    tf.function(lambda: strategy.run(add_one), autograph=False)()


def replicas_and_workers(strategy: tf.distribute.Strategy) -> str:
    """``2 replica(s) on 2 worker(s)``, for the stages' summary lines."""
    return f"{strategy.num_replicas_in_sync} replica(s) on {workers(strategy)} worker(s)"


def from_chief(strategy: tf.distribute.Strategy, payload: bytes) -> bytes:
    """The chief's ``payload`` on every worker (the others' is ignored): one all-gather in which only
    replica 0, the chief's first, contributes (the length, then the bytes as 64-bit words: the
    collectives move numbers, not strings, and a gather moves them unchanged)."""
    if workers(strategy) == 1:
        return payload
    words = np.concatenate([[len(payload)], np.frombuffer(payload + bytes(-len(payload) % 8), dtype=np.int64)])
    shares = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(words if context.replica_id_in_sync_group == 0 else words[:0])
    )
    gathered = strategy.gather(shares, axis=0).numpy()
    return gathered[1:].tobytes()[: gathered[0]]


@contextlib.contextmanager
def cluster_failures(resume: str) -> Iterator[None]:
    """One line instead of TensorFlow's errors when a worker of the cluster dies or cannot be
    reached mid-stage (the collectives abort on the others); ``resume`` says how to go on."""
    try:
        yield
    except PEER_ERRORS as err:
        raise UserError(
            f"a worker of the cluster (TF_CONFIG) stopped or cannot be reached (TensorFlow's "
            f"{type(err).__name__}); {resume}"
        ) from None


@functools.cache  # once per process
def fit_on_several_workers() -> None:
    """Let ``keras.Model.fit`` and ``evaluate`` run under MultiWorkerMirroredStrategy: Keras 3.15
    reduces values across replicas in two ways that strategy refuses (keras-team/keras#20585,
    tensorflow/tensorflow#72388), so that fit stops at its first batch. Both are replaced, for
    multi-worker strategies only (tests/test_train.py trains on two workers):
    - a batch of data is all-reduced, only to learn the shapes to build the model with: a nest,
      which that reduce does not take, and the shares of a short last batch differ in shape;
      the worker's own share gives the shapes;
    - each step's loss and metrics (per-replica scalars) are averaged along axis 0, which a scalar
      has not; averaged across replicas instead, as MirroredStrategy does."""
    reduce_per_replica, symbolic_build = trainer.reduce_per_replica, trainer.TensorFlowTrainer._maybe_symbolic_build

    def mean_across_replicas(values, strategy, reduction):
        if trainer._collective_all_reduce_multi_worker(strategy) and reduction in ("auto", "mean"):
            return tree.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    def build_on_own_share(model, iterator=None, data_batch=None):
        strategy = model._distribute_strategy
        if iterator is None or strategy is None or not trainer._collective_all_reduce_multi_worker(strategy):
            return symbolic_build(model, iterator, data_batch)
        for _, _, batches in iterator:  # as Keras does: the first batch of the epoch's iterator
            data_batch = tree.map_structure(lambda value: strategy.experimental_local_results(value)[0], next(batches))
            break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    trainer.reduce_per_replica = mean_across_replicas
    trainer.TensorFlowTrainer._maybe_symbolic_build = build_on_own_share
