"""Stage 2, prepare: verify every image, quarantine bad ones, drop duplicates, split train/val/test.

Input: ``data/raw/<class>/...``. Outputs in ``data/prepared/``:
- ``images/<class>/<hash>.jpg``: every usable image decoded once, EXIF-rotated, RGB, longest side
  at most ``prepare.max_side``, re-encoded as JPEG so later stages decode fast;
- ``manifest.csv``: path, label, split, sha256 (of the decoded pixels), width, height, source;
- ``labels.json``: the class names, list index = class index;
- ``quarantine.csv``: every raw file that was not used, with the reason (nothing is deleted);
- ``reports/data.json`` (a DVC metrics file): counts per class and split, quarantined, duplicates.
"""

import hashlib
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from pipeline.cli import UserError, run_stage
from pipeline.config import Config, load_config
from pipeline.data import JPEG_QUALITY, PREPARED_DIR, RAW_DIR, write_manifest
from pipeline.files import atomic_dir, write_json

REPORT = Path("reports/data.json")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Record:
    """One usable image: where it came from, where its normalized copy is, and its split."""

    source: str
    label: str
    path: str
    sha256: str
    width: int
    height: int
    split: str = ""


def scan(raw: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(class, file) for every candidate image, and the files ignored as not images.

    A class is a top-level sub-folder; images in folders below it belong to that class.
    Hidden files and folders, LICENSE* and README* files are ignored.
    """
    candidates, ignored = [], []
    for class_dir in sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            relative = path.relative_to(raw)
            if any(part.startswith(".") for part in relative.parts) or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                candidates.append((class_dir.name, path))
            else:
                ignored.append(str(relative))
    ignored += [p.name for p in raw.iterdir() if p.is_file()]  # LICENSE.txt, README, stray files
    return candidates, ignored


def normalize(job: tuple[str, Path, Path, int]) -> Record | tuple[str, str]:
    """Decode one file into a normalized JPEG; on failure return (source, reason) instead."""
    label, path, out_dir, max_side = job
    source = str(path.relative_to(RAW_DIR)) if path.is_relative_to(RAW_DIR) else str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.load()
    except Exception as err:  # Pillow raises many types for unreadable files; each is quarantined
        return source, f"unreadable: {type(err).__name__}: {err}".replace("\n", " ")
    pixels = np.asarray(im)
    sha256 = hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    relative = Path("images") / label / f"{sha256[:20]}.jpg"
    im.save(out_dir / relative, quality=JPEG_QUALITY)
    return Record(source, label, str(relative), sha256, pixels.shape[1], pixels.shape[0])


def drop_duplicates(images: list[Record]) -> tuple[list[Record], list[tuple[str, str]], int]:
    """Keep one copy of identical images; images found under two classes are excluded entirely."""
    by_hash: dict[str, list[Record]] = {}
    for image in images:
        by_hash.setdefault(image.sha256, []).append(image)
    kept, conflicts, duplicates = [], [], 0
    for copies in by_hash.values():
        labels = sorted({c.label for c in copies})
        if len(labels) > 1:
            conflicts += [(c.source, f"label conflict: same image in classes {', '.join(labels)}") for c in copies]
        else:
            kept.append(min(copies, key=lambda c: c.source))
            duplicates += len(copies) - 1
    return kept, conflicts, duplicates


def rank(seed: int, image: Record) -> str:
    """A per-image random but reproducible order key: depends only on the seed and the content."""
    return hashlib.sha256(f"{seed}:{image.sha256}".encode()).hexdigest()


def split(images: list[Record], cfg: Config) -> list[Record]:
    """Stratified split: within each class, images sorted by rank; the first go to val, then test.

    Ranks do not depend on the other images, so adding a few images moves at most the ones at the
    boundaries, and the same inputs and seed always give the same split.
    """
    result = []
    for label in sorted({i.label for i in images}):
        members = sorted((i for i in images if i.label == label), key=lambda i: rank(cfg.seed, i))
        if cfg.data.max_per_class:
            members = members[: cfg.data.max_per_class]
        n_val = round(len(members) * cfg.prepare.split.val)
        n_test = round(len(members) * cfg.prepare.split.test)
        if min(n_val, n_test) < 1 or len(members) - n_val - n_test < 1:
            raise UserError(
                f"class '{label}' has {len(members)} usable images, too few for prepare.split "
                f"(val {cfg.prepare.split.val}, test {cfg.prepare.split.test}): add images or drop the class"
            )
        for position, image in enumerate(members):
            image.split = "val" if position < n_val else "test" if position < n_val + n_test else "train"
        result += members
    return sorted(result, key=lambda i: (i.split, i.label, i.path))


def report(images: list[Record], quarantined: int, duplicates: int, ignored: int) -> dict:
    counts = {
        label: {s: sum(1 for i in images if i.label == label and i.split == s) for s in ("train", "val", "test")}
        for label in sorted({i.label for i in images})
    }
    return {
        "images": len(images),
        "classes": len(counts),
        "per_class": counts,
        "quarantined": quarantined,
        "duplicates_dropped": duplicates,
        "ignored_files": ignored,
    }


def main() -> None:
    cfg = load_config()
    if not RAW_DIR.is_dir():
        raise UserError(f"{RAW_DIR} is missing: run the download stage first (dvc repro)")
    candidates, ignored = scan(RAW_DIR)
    labels = sorted({label for label, _ in candidates})
    if len(labels) < 2:
        raise UserError(f"{RAW_DIR} has {len(labels)} class folder(s) with images; need at least 2")
    with atomic_dir(PREPARED_DIR) as out:
        for label in labels:
            (out / "images" / label).mkdir(parents=True)
        jobs = [(label, path, out, cfg.prepare.max_side) for label, path in candidates]
        with ProcessPoolExecutor() as pool:
            results = list(tqdm(pool.map(normalize, jobs, chunksize=16), total=len(jobs), desc="prepare"))
        images = [r for r in results if isinstance(r, Record)]
        bad = [r for r in results if not isinstance(r, Record)]
        images, conflicts, duplicates = drop_duplicates(images)
        quarantine = bad + conflicts
        images = split(images, cfg)
        write_manifest(out / "manifest.csv", list(asdict(images[0])), [list(asdict(i).values()) for i in images])
        write_manifest(out / "quarantine.csv", ["source", "reason"], [list(q) for q in sorted(quarantine)])
        write_json(out / "labels.json", labels)
    summary = report(images, len(quarantine), duplicates, len(ignored))
    write_json(REPORT, summary)
    print(f"prepare: {summary['images']} images in {summary['classes']} classes; "
          f"{len(quarantine)} quarantined (see {PREPARED_DIR / 'quarantine.csv'}), {duplicates} duplicates dropped")


if __name__ == "__main__":
    run_stage(main)
