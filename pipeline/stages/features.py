"""Stage 4, features: run the frozen backbone once over every (image, augmented copy).

The backbone is frozen during head training, so its output for a given image never changes:
computing it once here turns each training epoch from minutes into milliseconds. DVC reruns this
stage only when the augmented images or the backbone, weights, image size or precision change.

Outputs in ``data/features/``, in the format ``pipeline.model.feature_store`` owns: per split the pooled
features and class indices, one row per row of the augmented manifest's split, in order; the
backbone weights that made them (the train stage builds the final model from those); and, when
fine-tuning will train only the top blocks on offline-augmented images (``Config.activation_cut``),
the frozen prefix's output for the train and val images in 16 bits, so that fine-tuning runs only
the unfrozen top. Also the backbone's outputs on the test split's original files as the model
server makes them its input, in float32 (``served_test.npz``): evaluate then scores a model that
was not fine-tuned with its head alone, and reports what the served model answers on those files.

The backbone runs on every device the train stage trains on (``pipeline.model.devices``: all GPUs, or
every worker under ``TF_CONFIG``): each replica computes its share of each global batch
(``train.batch_size`` per replica, at most ``MAX_BACKBONE_BATCH``, times the replicas) and the
shares are gathered back in manifest order, so the outputs are those of one device. Only the chief
writes them, batch by batch into memory-mapped files, so memory stays flat on big datasets.
"""

import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import serving
from pipeline.cli import UserError, progress, run_stage
from pipeline.config import Config, load_config
from pipeline.data.manifests import AugmentedImage, image_batches, read_labels, read_rows, split_files
from pipeline.model import devices, feature_store, networks
from pipeline.model.feature_store import ACTIVATION_SPLITS, Meta, activation_storage, as_stored
from pipeline.paths import AUGMENTED_DIR, AUGMENTED_MANIFEST, FEATURES_DIR, PREPARED_LABELS, SPLITS
from pipeline.report import gradcam

RESUME_ON_CLUSTER = "start it and rerun the stage on every worker (dvc repro on the chief)"
MAX_BACKBONE_BATCH = 64  # images per replica per backbone pass: Inception v3 at 299 px needs ~2 GB for 64


def replica_rows(count: int, per_replica: int, context: tf.distribute.InputContext) -> np.ndarray:
    """The rows (of ``count``) that the input pipeline of ``context`` (one per worker) feeds its
    replicas, in the order they take them. Each global batch is cut into per-replica batches in
    replica order; a worker's replicas are numbered on from the previous worker's and its pipeline
    deals batches to them in turn, so gathering the replicas' outputs gives the rows in order. The
    last global batch is padded with copies of the last row: one input shape, so one trace (a new
    shape costs a retrace, ~2 s for a big backbone)."""
    global_batch = per_replica * context.num_replicas_in_sync
    steps = math.ceil(count / global_batch)
    pipelines = context.num_input_pipelines
    rows = np.arange(steps * global_batch).reshape(steps, pipelines, global_batch // pipelines)
    return np.minimum(rows[:, context.input_pipeline_id].ravel(), count - 1)


def on_every_replica(network: keras.Model, strategy: tf.distribute.Strategy) -> Callable:
    """A distributed batch -> the network's outputs for the whole global batch, each replica running
    its part; every worker gets all parts back. Traced once for all splits."""

    def on_replica(pixels):
        outputs = network(pixels, training=False)
        # In float32, exact for 16-bit values: collectives take no bfloat16 (gathering across devices).
        return [tf.cast(values, "float32") for values in (outputs if isinstance(outputs, list) else [outputs])]

    @tf.function
    def run(batch):
        # One gather per output: strategy.gather of a list returns the first replica's part only (TF 2.21).
        return [strategy.gather(values, axis=0) for values in strategy.run(on_replica, args=(batch,))]

    return run


def extract(
    run: Callable, strategy: tf.distribute.Strategy, paths: list[str], per_replica: int, desc: str
) -> Iterator[list[np.ndarray]]:
    """The network's outputs for the images at ``paths``, a global batch at a time, in order. Each
    worker reads and decodes only its replicas' images."""
    batches = strategy.distribute_datasets_from_function(
        lambda context: image_batches([paths[i] for i in replica_rows(len(paths), per_replica, context)], per_replica)
    )
    starts = range(0, len(paths), per_replica * strategy.num_replicas_in_sync)
    # zip stops at the last start without asking for one more batch: a mirrored iterator takes
    # seconds to find its end. replica_rows gave each replica exactly len(starts) batches.
    for start, batch in progress(zip(starts, batches), len(starts), desc, "batch"):
        yield [values.numpy()[: len(paths) - start] for values in run(batch)]


def write_served_test(
    cfg: Config, extractor: keras.Model, class_index: dict[str, int], batch_size: int, out: Path
) -> None:
    """``served_test.npz`` (pipeline.model.feature_store): the test files through the model server's
    own decoding (``serving.file_batches``) and the float32 backbone, as the exported model runs
    them, with the last feature maps of the images Grad-CAM will show. On the chief only: the test
    split is small next to the rest."""
    rows, paths = split_files("test")
    if not paths:
        return
    keep = gradcam.examples(np.array([class_index[r.label] for r in rows]))
    float32 = networks.in_float32(cfg.model, extractor)
    batches = serving.file_batches(paths, cfg.model.input_size, batch_size)
    features, maps = gradcam.predict_with_maps(float32, (batch.astype("float32") for batch in batches), keep)
    feature_store.write_served_test(out, paths, features, keep, maps)


def main() -> None:
    cfg = load_config()
    if not AUGMENTED_MANIFEST.is_file():
        raise UserError(f"{AUGMENTED_MANIFEST} is missing: run the augment stage first (dvc repro)")
    strategy = devices.distribution_strategy()  # before other TF ops: MultiWorkerMirroredStrategy needs that
    with devices.cluster_failures(RESUME_ON_CLUSTER):
        print(write_store(cfg, strategy))


def write_store(cfg: Config, strategy: tf.distribute.Strategy) -> str:
    """Every output of the stage (see the module docstring), written by the chief; its summary line."""
    keras.utils.set_random_seed(cfg.seed)
    policy = networks.use_precision(cfg.model)
    manifest = read_rows(AUGMENTED_MANIFEST, AugmentedImage)
    class_index = {name: i for i, name in enumerate(read_labels())}
    cut = cfg.activation_cut
    with strategy.scope():  # the weights on every replica (random ones too: copied from the first)
        extractor = networks.feature_extractor(cfg.model)
        network = networks.with_activations(extractor, cut) if cut else extractor
    run = on_every_replica(network, strategy)
    dim = extractor.output_shape[-1]
    storage = activation_storage(policy)
    # train.batch_size is the head's batch, which may be huge (rows of features are small); the
    # backbone's activations are not: at most MAX_BACKBONE_BATCH images per replica at a time.
    backbone_batch = min(cfg.train.batch_size, MAX_BACKBONE_BATCH)
    started = time.perf_counter()
    with devices.output_dir(strategy, FEATURES_DIR) as out:
        for split in SPLITS:
            rows = [r for r in manifest if r.split == split]
            features = feature_store.new_features(out, split, len(rows), dim)
            activations = None
            if cut and split in ACTIVATION_SPLITS:
                activations = feature_store.new_activations(
                    out, split, (len(rows), *network.output_shape[1][1:]), storage
                )
            batches = extract(
                run, strategy, [str(AUGMENTED_DIR / r.path) for r in rows], backbone_batch, desc=f"features {split}"
            )
            start = 0
            for values, *cut_values in batches:
                if activations is not None:
                    activations[start : start + len(values)] = as_stored(cut_values[0], storage)
                features[start : start + len(values)] = values
                start += len(values)
            for array in (features, activations):
                if array is not None:
                    array.flush()
            del features, activations
            feature_store.write_labels(out, split, [class_index[r.label] for r in rows])
        if devices.is_chief(strategy):
            write_served_test(cfg, extractor, class_index, backbone_batch, out)
        seconds = time.perf_counter() - started
        networks.backbone_of(extractor).save_weights(out / feature_store.BACKBONE_WEIGHTS)
        shutil.copy(PREPARED_LABELS, out / feature_store.LABELS)
        feature_store.write_meta(
            out,
            Meta(
                backbone=cfg.model.backbone,
                weights=cfg.model.weights,
                image_size=cfg.model.input_size,
                precision=policy,
                dim=dim,
                activation_cut=cut,
                activation_dtype=storage if cut else None,
                images=len(manifest),
                seconds=round(seconds, 2),
            ),
        )
    cached = f"; activations at {cut} cached for fine-tuning" if cut else ""
    return (
        f"features: {len(manifest)} images -> {dim}-d features in {seconds:.1f}s "
        f"({len(manifest) / seconds:.1f} images/s, {policy}, {devices.replicas_and_workers(strategy)}){cached}"
    )


if __name__ == "__main__":
    run_stage(main)
