"""Stage 2, prepare: decode every image once, quarantine bad ones, drop duplicates, split train/val/test.

Input: ``data/raw/<class>/...``. A class is a top-level folder (its name, Unicode NFC-normalized,
is the label); images in folders below it belong to it. Hidden files and folders, ``__MACOSX``,
``LICENSE*``, ``README*``, files directly in ``data/raw``, symlinked folders and files whose suffix
is not an image's (.jpg .jpeg .png .gif .bmp .webp .tif .tiff) are ignored and counted.

Outputs in ``data/prepared/``:
- ``images/<class>/<hash>.jpg``: every usable image decoded once (JPEG, PNG, GIF first frame, BMP,
  WebP, TIFF), EXIF-rotated, RGB (alpha composited onto white, 16-bit scaled to 8), longest side
  at most ``prepare.max_side``, re-encoded as JPEG so later stages decode fast;
- ``manifest.csv``: path, label, split, sha256 (of the decoded pixels), width, height (of the
  upright source image), source (its path in ``data/raw``);
- ``labels.json``: the class names, list index = class index;
- ``quarantine.csv``: source, reason for every candidate image not used: unreadable, truncated,
  not an image, too small (``prepare.min_side``), decompression bomb, or label conflict (the same
  image in two classes: every copy is excluded). Nothing in ``data/raw`` is deleted;
- ``duplicates.csv``: source, label, kind, same_as: ``exact`` copies (dropped, the first source
  is kept) and ``near`` duplicates (perceptual hash within ``prepare.near_duplicate_distance``
  bits: kept, but the whole group lands in one split, so test never holds a near-copy of a
  training image);
- ``reports/data.json`` (DVC metrics): counts per class and split, quarantined (by reason),
  duplicates, near-duplicate groups, ignored files.

The split is stratified: within each class, near-duplicate groups are ordered by a key hashed from
the seed and the image content (not the file name or the other images), and the first
``round(n * prepare.split.val)`` images go to val, the next ``round(n * prepare.split.test)`` to
test, the rest to train. Same inputs and seed give a byte-identical manifest; adding k images to a
class changes the split of at most 2k of its existing images (those at the two boundaries), and no
image of another class.
"""

import hashlib
import os
import shutil
import sys
import unicodedata
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from pipeline.cli import UserError, run_stage
from pipeline.config import Config, PrepareParams, load_config
from pipeline.data import JPEG_QUALITY, PREPARED_DIR, RAW_DIR, SPLITS, write_manifest
from pipeline.files import atomic_dir, readable, write_json
from pipeline.images import FORMATS, IMAGE_SUFFIXES, to_rgb

REPORT = Path("reports/data.json")
MANIFEST_COLUMNS = ["path", "label", "split", "sha256", "width", "height", "source"]
IGNORED_NAMES = ("LICENSE", "README")  # prefixes, any case
IMBALANCE_WARNING = 10  # warn when the largest class has more than this many times the smallest's images


@dataclass
class Record:
    """One usable image: its source, its normalized copy (first pending, then at ``path``), its split."""

    source: str
    label: str
    sha256: str
    width: int
    height: int
    phash: int
    pending: Path
    rank: str = ""
    split: str = ""

    @property
    def path(self) -> str:
        return f"images/{self.label}/{self.sha256[:20]}.jpg"


class Quarantined(Exception):
    """An image that cannot be used; the message is the reason recorded in quarantine.csv."""


# --- Finding the images -----------------------------------------------------------------------


def label_of(folder_name: str) -> str:
    return unicodedata.normalize("NFC", readable(folder_name))


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def scan(raw: Path) -> tuple[list[str], list[tuple[str, Path]], list[str]]:
    """The class names, (class, file) for every candidate image, and the ignored files."""
    classes = sorted({label_of(p.name) for p in raw.iterdir()
                      if p.is_dir() and not p.is_symlink() and not is_hidden(p.name)})
    candidates, ignored = [], []
    for folder, dirs, files in os.walk(raw):  # does not follow symlinked folders: they are ignored
        dirs.sort()
        relative = Path(folder).relative_to(raw)
        ignored += [readable(str(relative / d)) for d in dirs if (Path(folder) / d).is_symlink()]
        for name in sorted(files):
            path = relative / name
            if is_candidate(path):
                candidates.append((label_of(path.parts[0]), raw / path))
            else:
                ignored.append(readable(str(path)))
    return classes, candidates, ignored


def is_candidate(path: Path) -> bool:
    return (
        len(path.parts) > 1
        and not any(is_hidden(part) for part in path.parts)
        and not path.name.upper().startswith(IGNORED_NAMES)
        and path.suffix.lower() in IMAGE_SUFFIXES
    )


# --- Decoding each image once -----------------------------------------------------------------


def normalize(job: tuple[Path, Path, PrepareParams]) -> dict | str:
    """Decode one file and write its normalized JPEG to ``pending``: its facts, or why it is quarantined."""
    path, pending, params = job
    try:
        image = decode(path, params.min_side)
    except Quarantined as why:
        return str(why)
    except Exception as err:  # Pillow raises many types for broken files; each is quarantined
        return reason(err, path)
    pixels = np.asarray(image)
    sha256 = hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
    image.thumbnail((params.max_side, params.max_side), Image.Resampling.LANCZOS)
    image.save(pending, "JPEG", quality=JPEG_QUALITY)
    return {"sha256": sha256, "width": pixels.shape[1], "height": pixels.shape[0],
            "phash": int(str(imagehash.phash(image)), 16)}


def decode(path: Path, min_side: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd but readable files (corrupt EXIF, ...)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path, formats=FORMATS) as image:
            if min(image.size) < min_side:
                raise Quarantined(f"too small: {image.width}x{image.height} pixels, "
                                  f"below prepare.min_side={min_side}")
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))


def reason(err: Exception, path: Path) -> str:
    """A one-line quarantine reason, starting with a keyword the data report counts by."""
    message = " ".join(str(err).split())
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {message}"
    if isinstance(err, UnidentifiedImageError):
        with open(path, "rb") as fh:
            head = fh.read(16)
        return "empty file" if not head else f"not an image: a {'/'.join(FORMATS)} file does not start with {head!r}"
    if isinstance(err, OSError) and "truncated" in message:
        return f"truncated: {message}"
    return f"unreadable: {type(err).__name__}: {message}"


def decode_all(candidates: list[tuple[str, Path]], pending: Path, cfg: Config) -> tuple[list[Record], list[tuple]]:
    pending.mkdir()
    jobs = [(path, pending / f"{i}.jpg", cfg.prepare) for i, (_, path) in enumerate(candidates)]
    with ProcessPoolExecutor() as pool:
        results = list(tqdm(pool.map(normalize, jobs, chunksize=16), total=len(jobs), desc="prepare", disable=None))
    images, quarantine = [], []
    for (label, path), (_, pending_file, _), result in zip(candidates, jobs, results):
        source = readable(str(path.relative_to(RAW_DIR)))
        if isinstance(result, str):
            quarantine.append((source, result))
        else:
            rank = hashlib.sha256(f"{cfg.seed}:{result['sha256']}".encode()).hexdigest()
            images.append(Record(source, label, pending=pending_file, rank=rank, **result))
    return images, quarantine


# --- Duplicates -------------------------------------------------------------------------------


def drop_exact_duplicates(images: list[Record]) -> tuple[list[Record], list[tuple], list[list]]:
    """One copy of identical images; images found under two classes are label conflicts, all excluded."""
    by_hash: dict[str, list[Record]] = defaultdict(list)
    for image in images:
        by_hash[image.sha256].append(image)
    kept, conflicts, duplicates = [], [], []
    for copies in by_hash.values():
        copies.sort(key=lambda c: c.source)
        labels = sorted({c.label for c in copies})
        if len(labels) > 1:
            conflicts += [(c.source, f"label conflict: the same image is in classes {', '.join(labels)}")
                          for c in copies]
        else:
            kept.append(copies[0])
            duplicates += [[c.source, c.label, "exact", copies[0].source] for c in copies[1:]]
    return kept, conflicts, duplicates


def cap_per_class(images: list[Record], cap: int | None) -> list[Record]:
    """At most ``cap`` images per class (``data.max_per_class``), the first by rank."""
    if cap is None:
        return images
    by_label: dict[str, list[Record]] = defaultdict(list)
    for image in sorted(images, key=lambda i: i.rank):
        by_label[image.label].append(image)
    return [image for members in by_label.values() for image in members[:cap]]


def near_duplicate_groups(images: list[Record], distance: int) -> list[list[Record]]:
    """Groups of images linked by perceptual hashes at most ``distance`` bits apart (chains join).

    Every pair is compared with numpy on the 64-bit hashes, a block of rows at a time; the groups
    are the connected components of the resulting graph.
    """
    hashes = np.array([i.phash for i in images], dtype=np.uint64)
    block = max(1, 2**22 // max(1, len(hashes)))  # ~32 MB of XORed hashes per step
    rows, cols = [np.empty(0, dtype=np.intp)], [np.empty(0, dtype=np.intp)]
    for start in range(0, len(hashes), block):
        near = np.bitwise_count(hashes[start:start + block, None] ^ hashes[None, :]) <= distance
        r, c = np.nonzero(near)
        rows.append(r + start)
        cols.append(c)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_array((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(images), len(images)))
    _, group_of = connected_components(graph, directed=False)
    groups: dict[int, list[Record]] = defaultdict(list)
    for image, group in zip(images, group_of):
        groups[group].append(image)
    return [sorted(members, key=lambda i: i.rank) for members in groups.values()]


def near_duplicate_rows(groups: list[list[Record]]) -> list[list]:
    return [[i.source, i.label, "near", group[0].source] for group in groups for i in group[1:]]


# --- Splitting --------------------------------------------------------------------------------


def assign_splits(groups: list[list[Record]], cfg: Config) -> None:
    """Stratified by class, one split per near-duplicate group, in the order of the groups' rank keys.

    A group counts towards the class of its first member (by rank), so that near-duplicates in
    two classes still share a split.
    """
    by_label: dict[str, list[list[Record]]] = defaultdict(list)
    for group in groups:
        by_label[group[0].label].append(group)
    for members in by_label.values():
        members.sort(key=lambda g: g[0].rank)
        n = sum(len(g) for g in members)
        n_val = round(n * cfg.prepare.split.val)
        n_test = round(n * cfg.prepare.split.test)
        taken = 0
        for group in members:
            split = "val" if taken < n_val else "test" if taken < n_val + n_test else "train"
            for image in group:
                image.split = split
            taken += len(group)


def count_per_class(classes: list[str], images: list[Record]) -> dict[str, dict[str, int]]:
    counts = Counter((i.label, i.split) for i in images)
    return {label: {split: counts[label, split] for split in SPLITS} for label in classes}


def check_classes(per_class: dict[str, dict[str, int]], cfg: Config) -> None:
    for label, counts in per_class.items():
        if min(counts.values()) == 0:
            raise UserError(
                f"class '{label}' has {sum(counts.values())} usable images, too few for prepare.split "
                f"(val {cfg.prepare.split.val}, test {cfg.prepare.split.test}) to put one in each of "
                f"train, val and test (near-duplicates count as one): add images or remove the folder"
            )
    sizes = {label: sum(counts.values()) for label, counts in per_class.items()}
    largest, smallest = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
    if sizes[largest] > IMBALANCE_WARNING * sizes[smallest]:
        print(f"warning: classes are heavily imbalanced: '{largest}' has {sizes[largest]} images, "
              f"'{smallest}' only {sizes[smallest]}", file=sys.stderr)


# --- Outputs ----------------------------------------------------------------------------------


def move_into_place(images: list[Record], out: Path) -> None:
    for image in images:
        (out / image.path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(image.pending, out / image.path)


def report(per_class: dict, quarantine: list[tuple], exact: list[list], groups: list[list[Record]],
           ignored: list[str]) -> dict:
    near = [g for g in groups if len(g) > 1]
    return {
        "images": sum(sum(c.values()) for c in per_class.values()),
        "classes": len(per_class),
        "per_class": per_class,
        "per_split": {s: sum(c[s] for c in per_class.values()) for s in SPLITS},
        "quarantined": len(quarantine),
        "quarantined_by_reason": dict(sorted(Counter(r.split(":")[0] for _, r in quarantine).items())),
        "duplicates_dropped": len(exact),
        "near_duplicate_groups": len(near),
        "near_duplicate_images": sum(len(g) for g in near),
        "largest_near_duplicate_group": max((len(g) for g in near), default=0),
        "ignored_files": len(ignored),
    }


def main() -> None:
    cfg = load_config()
    if not RAW_DIR.is_dir():
        raise UserError(f"{RAW_DIR} is missing: run the download stage first (dvc repro)")
    classes, candidates, ignored = scan(RAW_DIR)
    if len(classes) < 2:
        raise UserError(f"{RAW_DIR} has {len(classes)} class folder(s) {classes}; need at least 2 "
                        "(one sub-folder of images per class)")
    with atomic_dir(PREPARED_DIR) as out:
        images, quarantine = decode_all(candidates, out / ".pending", cfg)
        images, conflicts, exact = drop_exact_duplicates(images)
        quarantine += conflicts
        images = cap_per_class(images, cfg.data.max_per_class)
        groups = near_duplicate_groups(images, cfg.prepare.near_duplicate_distance)
        assign_splits(groups, cfg)
        per_class = count_per_class(classes, images)
        check_classes(per_class, cfg)
        move_into_place(images, out)
        shutil.rmtree(out / ".pending")  # the normalized copies of duplicates and excluded images
        images.sort(key=lambda i: (i.split, i.label, i.path))
        write_manifest(out / "manifest.csv", MANIFEST_COLUMNS,
                       [[getattr(i, column) for column in MANIFEST_COLUMNS] for i in images])
        write_manifest(out / "quarantine.csv", ["source", "reason"], sorted(quarantine))
        write_manifest(out / "duplicates.csv", ["source", "label", "kind", "same_as"],
                       sorted(exact + near_duplicate_rows(groups)))
        write_json(out / "labels.json", classes)
    summary = report(per_class, quarantine, exact, groups, ignored)
    write_json(REPORT, summary)
    print(f"prepare: {summary['images']} images in {summary['classes']} classes "
          f"({', '.join(f'{s} {n}' for s, n in summary['per_split'].items())}); "
          f"{summary['quarantined']} quarantined (see {PREPARED_DIR / 'quarantine.csv'}), "
          f"{summary['duplicates_dropped']} exact duplicates dropped, "
          f"{summary['near_duplicate_groups']} near-duplicate groups, {summary['ignored_files']} files ignored")


if __name__ == "__main__":
    run_stage(main)
