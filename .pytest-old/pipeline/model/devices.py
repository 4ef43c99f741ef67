"""Where the backbone runs: one ``tf.distribute`` strategy for the features and train stages.

All visible GPUs of the machine (``MirroredStrategy``), or, with ``TF_CONFIG`` set, every worker of
a cluster (``MultiWorkerMirroredStrategy``: each worker runs the same stage with the same params and
data; collectives over the network keep them in step). Only the chief writes the stage's outputs.
"""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import tensorflow as tf

from pipeline.files import atomic_dir


def distribution_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored under TF_CONFIG; else mirrored over all GPUs, or over the logical CPU
    devices when the CPU was split into several (how the tests run it); else the default strategy.
    Create it before any other TensorFlow op: MultiWorkerMirroredStrategy must configure the runtime."""
    if os.environ.get("TF_CONFIG"):
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
    if workers(strategy) > 1:  # a barrier: one tiny all-reduce across the workers
        strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("SUM", tf.ones(())))


def replicas_and_workers(strategy: tf.distribute.Strategy) -> str:
    """``2 replica(s) on 2 worker(s)``, for the stages' summary lines."""
    return f"{strategy.num_replicas_in_sync} replica(s) on {workers(strategy)} worker(s)"
