"""Stage 3, augment: write augmented training images at the backbone's input size (albumentations).

Input: ``data/prepared``. Output: ``data/augmented/<split>/<class>/<name>_<copy>.jpg`` and
``data/augmented/manifest.csv`` (path, label, split, copy, source). Every training image gets its
resized original (copy 0) plus ``augment.copies`` random variants (random resized crop, horizontal
flip, brightness/contrast); val and test images are only resized and center-cropped.

Each variant's randomness is seeded from ``seed``, the image's content hash and the copy number,
so outputs are byte-identical across runs, whatever the order or number of worker processes.
"""

import hashlib
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

import albumentations as A
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.cli import UserError, run_stage
from pipeline.config import AugmentParams, Config, load_config
from pipeline.data import AUGMENTED_DIR, JPEG_QUALITY, PREPARED_DIR, read_manifest, write_manifest
from pipeline.files import atomic_dir


@cache
def resize_only(size: int) -> A.Compose:
    """Deterministic: shortest side to ``size``, then the central square (what inference does)."""
    return A.Compose([A.SmallestMaxSize(max_size=size), A.CenterCrop(size, size)])


@cache
def random_policy(size: int, policy: AugmentParams) -> A.Compose:
    return A.Compose(
        [
            A.RandomResizedCrop(size=(size, size), scale=policy.crop_scale),
            A.HorizontalFlip(p=policy.hflip),
            A.RandomBrightnessContrast(brightness_limit=policy.brightness, contrast_limit=policy.contrast, p=1.0),
        ]
    )


def variant_seed(seed: int, sha256: str, copy: int) -> int:
    return int(hashlib.sha256(f"{seed}:{sha256}:{copy}".encode()).hexdigest()[:8], 16)


def render(job: tuple[dict[str, str], int, Config, Path]) -> list[list]:
    """Write copy ``0..copies`` of one image; returns its manifest rows."""
    row, copies, cfg, out = job
    size = cfg.model.input_size
    pixels = np.asarray(Image.open(PREPARED_DIR / row["path"]).convert("RGB"))
    stem = Path(row["path"]).stem
    rows = []
    for copy in range(copies + 1):
        if copy == 0:
            image = resize_only(size)(image=pixels)["image"]
        else:
            transform = random_policy(size, cfg.augment)
            transform.set_random_seed(variant_seed(cfg.seed, row["sha256"], copy))
            image = transform(image=pixels)["image"]
        relative = Path(row["split"]) / row["label"] / f"{stem}_{copy}.jpg"
        Image.fromarray(image).save(out / relative, quality=JPEG_QUALITY)
        rows.append([str(relative), row["label"], row["split"], copy, row["path"]])
    return rows


def main() -> None:
    cfg = load_config()
    manifest_path = PREPARED_DIR / "manifest.csv"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} is missing: run the prepare stage first (dvc repro)")
    manifest = read_manifest(manifest_path)
    with atomic_dir(AUGMENTED_DIR) as out:
        for split, label in {(r["split"], r["label"]) for r in manifest}:
            (out / split / label).mkdir(parents=True, exist_ok=True)
        jobs = [(r, cfg.augment.copies if r["split"] == "train" else 0, cfg, out) for r in manifest]
        with ProcessPoolExecutor() as pool:
            rows = [row for rows in tqdm(pool.map(render, jobs, chunksize=8), total=len(jobs), desc="augment")
                    for row in rows]
        write_manifest(out / "manifest.csv", ["path", "label", "split", "copy", "source"], rows)
    print(f"augment: {len(rows)} images at {cfg.model.input_size}px in {AUGMENTED_DIR}")


if __name__ == "__main__":
    run_stage(main)
