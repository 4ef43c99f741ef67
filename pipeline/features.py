"""Stage 4, features: run the frozen backbone once over every (image, augmented copy).

The backbone is frozen during head training, so its output for a given image never changes:
computing it once here turns each training epoch from minutes into milliseconds. DVC reruns this
stage only when the augmented images or the backbone, weights or image size change.

Outputs in ``data/features/``: ``<split>.npy`` (float32, one row per row of the augmented
manifest's split, in order), ``<split>_labels.npy`` (class indices into ``labels.json``),
``meta.json``, and ``backbone.weights.h5``: the exact backbone weights that made them, which the
train stage builds the final model from (with ``model.weights: none`` a rebuilt backbone would have
other random weights). Rows are written batch by batch into memory-mapped files, so memory stays
flat on big datasets.
"""

import shutil
import time

import keras
import numpy as np
from tqdm import tqdm

from pipeline.cli import UserError, run_stage
from pipeline.config import load_config
from pipeline.data import AUGMENTED_DIR, FEATURES_DIR, PREPARED_DIR, SPLITS, image_batches, read_labels, read_manifest
from pipeline.files import atomic_dir, write_json
from pipeline.models import BACKBONE_WEIGHTS, backbone_of, feature_extractor


def main() -> None:
    cfg = load_config()
    manifest_path = AUGMENTED_DIR / "manifest.csv"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} is missing: run the augment stage first (dvc repro)")
    keras.utils.set_random_seed(cfg.seed)
    manifest = read_manifest(manifest_path)
    class_index = {name: i for i, name in enumerate(read_labels())}
    extractor = feature_extractor(cfg.model)
    dim = extractor.output_shape[-1]
    started = time.perf_counter()
    with atomic_dir(FEATURES_DIR) as out:
        for split in SPLITS:
            rows = [r for r in manifest if r["split"] == split]
            features = np.lib.format.open_memmap(out / f"{split}.npy", mode="w+", dtype="float32",
                                                 shape=(len(rows), dim))
            batches = image_batches([str(AUGMENTED_DIR / r["path"]) for r in rows], cfg.train.batch_size)
            start = 0
            for batch in tqdm(batches, desc=f"features {split}", unit="batch"):
                values = extractor.predict_on_batch(batch)
                features[start : start + len(values)] = values
                start += len(values)
            features.flush()
            del features
            np.save(out / f"{split}_labels.npy", np.array([class_index[r["label"]] for r in rows], dtype="int32"))
        seconds = time.perf_counter() - started
        backbone_of(extractor).save_weights(out / BACKBONE_WEIGHTS)
        shutil.copy(PREPARED_DIR / "labels.json", out / "labels.json")
        write_json(out / "meta.json", {"backbone": cfg.model.backbone, "weights": cfg.model.weights,
                                       "image_size": cfg.model.input_size, "dim": dim, "images": len(manifest),
                                       "seconds": round(seconds, 2)})
    print(f"features: {len(manifest)} images -> {dim}-d features in {seconds:.1f}s "
          f"({len(manifest) / seconds:.1f} images/s)")


if __name__ == "__main__":
    run_stage(main)
