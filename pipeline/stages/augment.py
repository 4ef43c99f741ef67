"""Stage 3, augment: the training images' random variants at the backbone's input size, and a preview.

Input: ``data/prepared``. Outputs:
- ``data/augmented/<split>/<class>/<name>_<copy>.jpg`` and ``data/augmented/manifest.csv`` (path,
  label, split, copy, source): every image as the model's input (copy 0: its central square at the
  input size, made by pipeline/data/images.py ``model_input``, the function the model server uses)
  and, for training images, copies ``1..augment.copies`` drawn from the policy in
  pipeline/data/augmentation.py on the whole prepared image (none when ``augment.mode`` is
  ``online``: training then augments each batch instead);
- ``reports/augment_gallery.png``: one training image per class beside variants from the offline
  policy and from the online Keras layers (a DVC plot; the same seeds, so the same picture each run),
  drawn at most ``GALLERY_SIDE`` pixels a side whatever the image size, so that its memory is bounded.

Each variant's randomness comes from ``seed``, the image's content hash and the copy number, so
outputs are byte-identical across runs, whatever the order or number of worker processes.

DVC deletes ``data/augmented`` before running the stage, so rendered files are also kept in a
content-addressed cache (``$PIPELINE_CACHE_DIR/augment``, default ``~/.cache/transfer-pipeline``).
An entry's key covers everything its bytes depend on: the prepared file's bytes, the copy number,
the seed, the policy, the image size, the JPEG quality, this code (with pipeline/data/images.py
and augmentation.py) and the imaging libraries' versions. A re-run after adding images renders only the new ones; any other change misses the
cache rather than reuse a stale file. The cache only grows; deleting it is always safe.
"""

import hashlib
import io
import json
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import cv2
import matplotlib
import numpy as np
from PIL import Image

from pipeline.cli import UserError, progress, run_stage
from pipeline.config import Config, load_config
from pipeline.data import augmentation, images
from pipeline.data.augmentation import offline_policy, offline_variant, online_variants, variant_seed
from pipeline.data.images import model_input, save_jpeg
from pipeline.data.manifests import AugmentedImage, PreparedImage, read_rows, write_rows
from pipeline.files import atomic_dir, atomic_file, cache_root
from pipeline.paths import (
    AUGMENT_GALLERY,
    AUGMENTED_DIR,
    AUGMENTED_MANIFEST,
    JPEG_QUALITY,
    PREPARED_DIR,
    PREPARED_MANIFEST,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

GALLERY_CLASSES = 10
GALLERY_VARIANTS = 4
# Pixels a side the gallery draws at most: every backbone's native size (224-300) fits, so at those
# sizes it shows the stage's variants exactly; its cells are ~130 px, so larger would show nothing
# more, while the online layers' batch (classes x variants images) grows with the square of the side.
GALLERY_SIDE = 300


def render_cache_dir() -> Path:
    return cache_root() / "augment"


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def fingerprints(cfg: Config) -> tuple[str, str]:
    """What decides a file's bytes besides the image and copy number: for originals, for variants."""
    common = {
        "size": cfg.model.input_size,
        "jpeg_quality": JPEG_QUALITY,
        "code": [
            hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in (images.__file__, augmentation.__file__, __file__)
        ],
        "libraries": [version(name) for name in ("albumentations", "albucore", "pillow", "numpy")] + [cv2.__version__],
    }
    policy = cfg.augment.model_dump(mode="json", exclude={"mode", "copies", "online"})  # online: no file changes
    return digest(common), digest({**common, "seed": cfg.seed, "policy": policy})


def original(data: bytes, cfg: Config) -> np.ndarray:
    """Copy 0: the prepared image (its JPEG bytes) as the model's input, the served path's pixels."""
    return model_input(io.BytesIO(data), cfg.model.input_size)


def variant(pixels: np.ndarray, copy: int, sha256: str, cfg: Config) -> np.ndarray:
    """Copy ``copy`` > 0: the policy on the whole decoded prepared image, seeded by (seed, image, copy)."""
    return offline_variant(
        offline_policy(cfg.model.input_size, cfg.augment), pixels, variant_seed(cfg.seed, sha256, copy)
    )


def encode_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    save_jpeg(Image.fromarray(pixels), buffer)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@dataclass(frozen=True)
class Job:
    """One prepared image to write copies 0..copies of (picklable, for the worker processes)."""

    row: PreparedImage
    copies: int
    cfg: Config
    out: Path
    cache: Path
    fingerprints: tuple[str, str]


def render(job: Job) -> tuple[list[AugmentedImage], int]:
    """Write one image's copies into ``job.out``, rendering only those not in the cache.

    Returns its manifest rows and how many copies were rendered.
    """
    row = job.row
    data = (PREPARED_DIR / row.path).read_bytes()
    file_sha = hashlib.sha256(data).hexdigest()
    pixels, rendered, rows = None, 0, []
    for copy in range(job.copies + 1):
        key = digest([file_sha, row.sha256, copy, job.fingerprints[copy > 0]])
        cached = job.cache / key[:2] / f"{key}.jpg"
        if not cached.is_file():
            if copy == 0:
                rendering = original(data, job.cfg)
            else:
                pixels = decode(data) if pixels is None else pixels
                rendering = variant(pixels, copy, row.sha256, job.cfg)
            with atomic_file(cached, "wb") as fh:  # concurrent runs write identical bytes; rename is atomic
                fh.write(encode_jpeg(rendering))
            rendered += 1
        relative = Path(row.split) / row.label / f"{Path(row.path).stem}_{copy}.jpg"
        shutil.copyfile(cached, job.out / relative)  # a copy, so edits in the workspace never reach the cache
        rows.append(AugmentedImage(str(relative), row.label, row.split, copy, row.path))
    return rows, rendered


def render_all(jobs: list[Job]) -> tuple[list[AugmentedImage], int]:
    # One process per core, so one OpenCV thread per process.
    with ProcessPoolExecutor(initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        results = list(progress(pool.map(render, jobs, chunksize=8), len(jobs), "augment", "image"))
    return [r for rows, _ in results for r in rows], sum(n for _, n in results)


def gallery_samples(manifest: list[PreparedImage]) -> list[PreparedImage]:
    """The first training image of each class (of the first ``GALLERY_CLASSES`` classes)."""
    first: dict[str, PreparedImage] = {}
    for row in manifest:
        if row.split == "train":
            first.setdefault(row.label, row)
    return [first[label] for label in sorted(first)[:GALLERY_CLASSES]]


def thumbnail(pixels: np.ndarray, side: int) -> np.ndarray:
    """A square image shrunk to ``side`` pixels a side (unchanged when it has that size)."""
    return pixels if len(pixels) == side else cv2.resize(pixels, (side, side), interpolation=cv2.INTER_AREA)


def gallery_variants(cfg: Config) -> tuple[int, int]:
    """How many offline and online variants of each sample the gallery draws: those training sees."""
    mode = cfg.augment.mode
    offline = min(cfg.augment.copies, GALLERY_VARIANTS) if mode in ("offline", "both") else 0
    return offline, GALLERY_VARIANTS if mode in ("online", "both") else 0


def write_gallery(manifest: list[PreparedImage], cfg: Config) -> None:
    """One row per sample: the resized original, then the variants training really sees: offline ones
    (as the stage writes them, shrunk to at most ``GALLERY_SIDE``; as many as ``augment.copies``, up to
    GALLERY_VARIANTS) when the mode writes them, online ones (the Keras layers run at that side) when
    the mode runs them."""
    samples = gallery_samples(manifest)
    side = min(cfg.model.input_size, GALLERY_SIDE)
    n_offline, n_online = gallery_variants(cfg)
    files = [(PREPARED_DIR / r.path).read_bytes() for r in samples]
    originals = np.stack([thumbnail(original(data, cfg), side) for data in files])
    offline = [
        [thumbnail(variant(decode(data), k, r.sha256, cfg), side) for k in range(1, n_offline + 1)]
        for data, r in zip(files, samples)
    ]
    online = np.zeros((len(samples), 0, *originals.shape[1:]), "uint8")
    if n_online:
        batch = np.repeat(originals.astype("float32"), n_online, axis=0)
        online = online_variants(cfg, batch, side).round().clip(0, 255).astype("uint8")
        online = online.reshape(len(samples), n_online, *originals.shape[1:])

    titles = [
        "original",
        *(f"offline {k}" for k in range(1, n_offline + 1)),
        *(f"online {k}" for k in range(1, n_online + 1)),
    ]
    fig, axes = plt.subplots(
        len(samples), len(titles), squeeze=False, figsize=(1.4 * len(titles), 1.4 * len(samples) + 0.5)
    )
    for i, row in enumerate(samples):
        for ax, image in zip(axes[i], [originals[i], *offline[i], *online[i]]):
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(row.label, fontsize=9)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=9)
    fig.suptitle(
        f"augment.mode={cfg.augment.mode}: offline = albumentations (augment stage), online = Keras layers", fontsize=10
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    with atomic_file(AUGMENT_GALLERY, "wb") as fh:  # a 256-colour palette: a third of the size, plenty for a preview
        Image.open(buffer).convert("RGB").quantize(256).save(fh, format="PNG", optimize=True)


def main() -> None:
    cfg = load_config()
    manifest_path = PREPARED_MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} is missing: run the prepare stage first (dvc repro)")
    manifest = read_rows(manifest_path, PreparedImage)
    cache = render_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the render cache {cache} ({err.strerror}): set PIPELINE_CACHE_DIR to a writable folder"
        ) from None
    if cfg.prepare.max_side < cfg.model.input_size:
        print(
            f"warning: prepare.max_side {cfg.prepare.max_side} is below the input size {cfg.model.input_size}: "
            "photos larger than that train upscaled from prepare's copy but are served downscaled from the "
            "file; raise prepare.max_side",
            file=sys.stderr,
        )
    keys = fingerprints(cfg)
    with atomic_dir(AUGMENTED_DIR) as out:
        for split, label in {(r.split, r.label) for r in manifest}:
            (out / split / label).mkdir(parents=True, exist_ok=True)
        copies = {"train": cfg.augment.offline_copies}
        rows, rendered = render_all([Job(r, copies.get(r.split, 0), cfg, out, cache, keys) for r in manifest])
        write_rows(out / AUGMENTED_MANIFEST.name, AugmentedImage, rows)
    write_gallery(manifest, cfg)
    print(
        f"augment: {len(rows)} images at {cfg.model.input_size}px in {AUGMENTED_DIR} "
        f"({rendered} rendered, {len(rows) - rendered} from the cache in {cache}); preview in {AUGMENT_GALLERY}"
    )


if __name__ == "__main__":
    run_stage(main)
