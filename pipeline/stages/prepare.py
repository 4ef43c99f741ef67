"""Stage 2, prepare: decode every image once, quarantine bad ones, drop duplicates, split train/val/test.

Input: ``data/raw``, in one of three layouts (``layout`` in the data report and the summary line):

- ``class_folders``: one folder per class, ``data/raw/<class>/...``. The label is the top folder's
  name, Unicode NFC-normalized; images in folders below it belong to it. With ``data.class_depth``
  N the classes are the folders N levels down and the label is their path: with 2,
  ``dogs/husky/1.jpg`` is labelled ``dogs/husky``, and images less deep are ignored.
- ``split_folders``: every top-level folder is a split folder, ``train``, ``val`` (or ``valid``,
  ``validation``) or ``test`` in any case, each holding class folders as above; ``train`` is
  needed. The given split is kept. Split folders next to other folders, two folders for one split
  or a class missing from one split folder stop the stage with one line.
- ``labels_csv``: the download stage copied the ``data.labels`` table, ``path,label[,split]``, to
  ``data/raw/.labels.csv`` with paths relative to ``data/raw``. Only the files it lists are used,
  wherever they lie, with its labels (NFC-normalized) and, where the ``split`` cell is not empty,
  its split (``train``, ``val``, ``valid``, ``validation``, ``test``, any case). Bad rows are
  quarantined (``missing file``, ``absolute path``, ``empty label``, ``bad label`` (``.`` or
  ``..`` parts, a leading ``/``, control characters), ``unknown split``, ``listed twice`` (the
  first row counts), ``malformed row``); files it does not list are ignored.

Folder names (and table labels) that differ only in their Unicode form (``café`` as NFC or as
NFD, the way macOS writes it) are one name to Unicode and to macOS, so they are one class: a
warning names the folders merged. Classes whose names differ only in case stay apart, with a
warning (a case-insensitive file system would merge their folders).

Ignored, each listed by name with its reason in ``ignored.csv`` (in ``labels_csv`` a listed file
is used whatever its name): hidden files and everything in hidden folders (a name starting with
``.``: ``.ipynb_checkpoints``, ``.git``, ``.DS_Store``; and ``__MACOSX``), symlinked folders (not
followed), anything but regular files (FIFOs, broken links), files without an image suffix
(pipeline/data/images.py IMAGE_SUFFIXES; licences and readmes, ``LICENSE``, ``LICENSE.txt``,
``README.md``..., get their own reason), and files outside the class folders.

Outputs in ``data/prepared/``:
- ``images/<class>/<hash>.jpg``: every usable image decoded once (JPEG, PNG, GIF first frame, BMP,
  WebP, TIFF), EXIF-rotated, sRGB (embedded colour profiles converted, alpha composited onto
  white, 16-bit and float pixels scaled to 8 bits: pipeline/data/images.py), shorter side
  at most ``prepare.max_side`` (the longer one keeps the aspect ratio, so a crop of the image keeps
  its resolution), re-encoded as JPEG so later stages decode fast. ``<class>`` is the
  label with each ``/`` written ``__``, so that it is one folder;
- ``manifest.csv``: path, label, split, sha256 (of the decoded pixels), width, height (of the
  upright source image), source (its path in ``data/raw``);
- ``labels.json``: the class names, list index = class index;
- ``quarantine.csv``: source, reason for every candidate image not used: unreadable, truncated,
  not an image, too small (``prepare.min_side``), too elongated (longer side over
  ``prepare.max_aspect_ratio`` times the shorter: the model sees a photo's central square, which
  would hold little of it), too large (``prepare.max_pixels``, at most what the model server decodes,
  ``config.MAX_MEGAPIXELS``: checked from the file's header, so a decompression bomb is never
  decoded), pixel values out of range
  (float or 32-bit pixels outside 0..1, 0..255 or 0..65535), label conflict (the same
  image in two classes: every copy is excluded), or a bad row of the labels table. Nothing in
  ``data/raw`` is deleted;
- ``ignored.csv``: source, reason for every file ignored (see above, or not listed in the table);
- ``duplicates.csv``: source, label, kind, same_as: ``exact`` copies (dropped, the first source
  is kept) and ``near`` duplicates (perceptual hash within ``prepare.near_duplicate_distance``
  bits and thumbnails alike, checked pair by pair: pipeline/sources/dedupe.py; kept, but the whole
  group lands in one split, so test never holds a near-copy of a training image). ``cross_split``:
  a near-duplicate or exact copy that the source put in another split than ``same_as``; it is kept
  there (an exact copy once per split, sharing one file);
- ``reports/data.json`` (DVC metrics): layout, splits given, counts per class and split,
  quarantined (by reason), duplicates, near-duplicate groups, images not searched for
  near-duplicates (too little detail for their hash to tell copies from other pictures: digits,
  documents; also a note line), ``cross_split`` (groups spanning splits, their images, and pictures
  exactly alike in two splits: leakage, also a warning line), ignored files (by reason), colour
  profiles converted and unusable (those pixels are taken as sRGB, and a note names the files).

Splits given by the source are kept. The others (all three for class folders or a table without
split cells) are drawn from the images given ``train`` or no split, stratified: near-duplicate
groups are ordered by a key hashed from the seed and the image content (not the file name or the
other images), and each goes to the first drawn split with room for it: of a class's n images,
val (when drawn) holds ``round(n * prepare.split.val)``, test (when drawn)
``round(n * prepare.split.test)``, train the rest. A class whose near-duplicate groups leave its
splits more than 1 % of its images off those sizes stops the stage, naming its largest group.
``data.max_per_class`` keeps that many per class and given split, the first by that key. Same
inputs and seed give a byte-identical manifest; adding k single images to a class changes the
split of at most 2k of its existing images (those at the two boundaries), and no image of another
class.
"""

import hashlib
import os
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.cli import UserError, progress, run_stage
from pipeline.config import Config, PrepareParams, load_config
from pipeline.data.images import FORMATS, Unconvertible, decode, save_jpeg, shorter_side_at_most
from pipeline.data.manifests import PreparedImage, write_manifest, write_rows
from pipeline.files import atomic_dir, write_json
from pipeline.paths import DATA_REPORT, PREPARED_DIR, PREPARED_LABELS, PREPARED_MANIFEST, RAW_DIR, SPLITS
from pipeline.sources.dedupe import (
    cross_split,
    drop_exact_duplicates,
    fingerprints,
    near_duplicate_groups,
    near_duplicate_rows,
)
from pipeline.sources.layouts import Found, Record, find_images, named, source_of
from pipeline.sources.splits import (
    assign_splits,
    cap_per_class,
    check_classes,
    check_enough_classes,
    check_fractions,
    count_per_class,
    unused_files,
)

# --- Decoding each image once -----------------------------------------------------------------


class Quarantined(Exception):
    """An image that cannot be used; the message is the reason recorded in quarantine.csv."""


def normalize(job: tuple[Path, Path, PrepareParams]) -> dict | str:
    """Decode one file and write its normalized JPEG to ``pending``: its facts, or why it is quarantined."""
    path, pending, params = job
    Image.MAX_IMAGE_PIXELS = None  # Pillow's "decompression bomb" limit (89.5 Mpx): prepare.max_pixels instead
    try:
        image, profile = decode(path, usable_shape(params))
    except Quarantined as why:
        return str(why)
    except Exception as err:  # Pillow raises many types for broken files; each is quarantined
        return reason(err, path)
    pixels = np.asarray(image)
    sha256 = hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
    image = shorter_side_at_most(image, params.max_side)
    save_jpeg(image, pending)
    return {
        "sha256": sha256,
        "width": pixels.shape[1],
        "height": pixels.shape[0],
        **fingerprints(image),
        "profile": profile,
    }


def usable_shape(params: PrepareParams) -> Callable[[Image.Image], None]:
    """A check for images.decode, from the file's header before any pixel is decoded: quarantine
    images whose shorter side is below ``prepare.min_side``, whose sides differ by more than
    ``prepare.max_aspect_ratio``, or that have more than ``prepare.max_pixels`` (at most what the
    model server decodes, so the test split holds only images it answers for)."""

    def check(image: Image.Image) -> None:
        width, height = image.size
        size = f"{width}x{height} pixels"
        if min(width, height) < params.min_side:
            raise Quarantined(f"too small: {size}, below prepare.min_side={params.min_side}")
        ratio = max(width, height) / min(width, height)
        if ratio > params.max_aspect_ratio:
            raise Quarantined(
                f"too elongated: {size}, one side {ratio:.1f} times the other, above "
                f"prepare.max_aspect_ratio={params.max_aspect_ratio:g} (the model sees the central square)"
            )
        if width * height > params.max_pixels:
            raise Quarantined(
                f"too large: {size} ({width * height / 1e6:.1f} megapixels), larger "
                f"than {params.max_pixels / 1e6:g} megapixels (prepare.max_pixels={params.max_pixels})"
            )

    return check


def reason(err: Exception, path: Path) -> str:
    """A one-line quarantine reason, starting with a keyword the data report counts by."""
    message = " ".join(str(err).split())
    if isinstance(err, Unconvertible):
        return message  # "pixel values out of range: ..."
    if isinstance(err, UnidentifiedImageError):
        with open(path, "rb") as fh:
            head = fh.read(16)
        return "empty file" if not head else f"not an image: a {'/'.join(FORMATS)} file does not start with {head!r}"
    if isinstance(err, OSError) and "truncated" in message:
        return f"truncated: {message}"
    return f"unreadable: {type(err).__name__}: {message}"


def decode_all(candidates: list[tuple[str, Path, str]], pending: Path, cfg: Config) -> tuple[list[Record], list[tuple]]:
    pending.mkdir()
    jobs = [(path, pending / f"{i}.jpg", cfg.prepare) for i, (_, path, _) in enumerate(candidates)]
    with ProcessPoolExecutor() as pool:
        results = list(progress(pool.map(normalize, jobs, chunksize=16), len(jobs), "prepare", "image"))
    images, quarantine = [], []
    for (label, path, given), (_, pending_file, _), result in zip(candidates, jobs, results):
        source = source_of(path)
        if isinstance(result, str):
            quarantine.append((source, result))
        else:
            rank = hashlib.sha256(f"{cfg.seed}:{result['sha256']}".encode()).hexdigest()
            images.append(Record(source, label, pending=pending_file, given=given, rank=rank, **result))
    return images, quarantine


# --- Outputs ----------------------------------------------------------------------------------


def move_into_place(images: list[Record], out: Path) -> None:
    for image in images:
        (out / image.path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(image.pending, out / image.path)  # exact copies in two given splits: the same bytes twice


def by_reason(reasons: list[str]) -> dict[str, int]:
    """How many of each kind: the words before the first colon."""
    return dict(sorted(Counter(r.split(":")[0] for r in reasons).items()))


def report(
    found: Found,
    images: list[Record],
    per_class: dict,
    quarantine: list[tuple],
    exact: list[list],
    groups: list[list[Record]],
    leakage: dict[str, int],
    unsearched: int,
) -> dict:
    near = [g for g in groups if len(g) > 1]
    return {
        "layout": found.layout,
        "splits_given": list(found.given),
        "images": sum(sum(c.values()) for c in per_class.values()),
        "classes": len(per_class),
        "per_class": per_class,
        "per_split": {s: sum(c[s] for c in per_class.values()) for s in SPLITS},
        "quarantined": len(quarantine),
        "quarantined_by_reason": by_reason([r for _, r in quarantine]),
        "duplicates_dropped": len(exact),
        "near_duplicate_groups": len(near),
        "near_duplicate_images": sum(len(g) for g in near),
        "largest_near_duplicate_group": max((len(g) for g in near), default=0),
        "near_duplicates_not_searched": unsearched,
        "cross_split": leakage,
        "ignored_files": len(found.ignored),
        "ignored_by_reason": by_reason([r for _, r, _ in found.ignored]),
        "colour_profiles": {
            "converted": sum(i.profile == "converted" for i in images),
            "unusable": sum(i.profile.startswith("unusable") for i in images),
        },
    }


def warn_about_names(found: Found) -> None:
    """Class names that look alike: merged Unicode forms (one class), names apart only by case (two)."""
    if found.merged:
        merges = [
            f"'{label}' from {' and '.join(ascii(form) for form in forms)}" for label, forms in found.merged.items()
        ]
        print(
            f"warning: {len(merges)} class(es) merge names that differ only in their Unicode form (NFC/NFD, one "
            f"name to Unicode and to macOS): {named(merges)}; rename one if they are different classes",
            file=sys.stderr,
        )
    cases = defaultdict(list)
    for label in found.classes:
        cases[label.casefold()].append(label)
    alike = [" and ".join(f"'{label}'" for label in labels) for labels in cases.values() if len(labels) > 1]
    if alike:
        print(
            f"warning: {len(alike)} group(s) of classes differ only in case and stay apart: {named(alike)} (a "
            "case-insensitive file system, macOS or Windows, would merge their folders)",
            file=sys.stderr,
        )


def note_unusable_profiles(images: list[Record]) -> None:
    unusable = sorted((i.source, i.profile) for i in images if i.profile.startswith("unusable"))
    if unusable:
        print(
            f"note: {len(unusable)} images have a colour profile that cannot be used (the first: "
            f"{unusable[0][1].removeprefix('unusable: ')}); "
            f"their pixels are taken as sRGB: {named([source for source, _ in unusable])}",
            file=sys.stderr,
        )


def main() -> None:
    cfg = load_config()
    if not RAW_DIR.is_dir():
        raise UserError(f"{RAW_DIR} is missing: run the download stage first (dvc repro)")
    found = find_images(RAW_DIR, cfg.data.class_depth)
    check_enough_classes(found)
    warn_about_names(found)
    with atomic_dir(PREPARED_DIR) as out:
        images, quarantine = decode_all(found.candidates, out / ".pending", cfg)
        quarantine += found.bad_rows
        images, conflicts, exact = drop_exact_duplicates(images)
        quarantine += conflicts
        images = cap_per_class(images, cfg.data.max_per_class)
        groups, unsearched = near_duplicate_groups(images, cfg.prepare.near_duplicate_distance)
        assign_splits(groups, found.given, cfg.prepare.split)
        per_class = count_per_class(found.classes, images)
        check_classes(per_class, found.given, cfg.prepare.split, unused_files(found, quarantine))
        check_fractions(per_class, groups, found.given, cfg.prepare)
        move_into_place(images, out)
        shutil.rmtree(out / ".pending")  # the normalized copies of duplicates and excluded images
        images.sort(key=lambda i: (i.split, i.label, i.path))
        write_rows(out / PREPARED_MANIFEST.name, PreparedImage, [i.row() for i in images])
        write_manifest(out / "quarantine.csv", ["source", "reason"], sorted(quarantine))
        write_manifest(out / "ignored.csv", ["source", "reason"], sorted((s, r) for s, r, _ in found.ignored))
        write_manifest(
            out / "duplicates.csv", ["source", "label", "kind", "same_as"], sorted(exact + near_duplicate_rows(groups))
        )
        write_json(out / PREPARED_LABELS.name, found.classes)
    summary = report(found, images, per_class, quarantine, exact, groups, cross_split(groups), unsearched)
    write_json(DATA_REPORT, summary)
    note_unusable_profiles(images)
    if unsearched:
        print(
            f"note: {unsearched} of {len(images)} images have too little detail for their perceptual hash to tell "
            "near-copies from other pictures (flat images, or hashes shared by many: digits, documents, plain "
            "backgrounds): they are not searched for near-duplicates; exact copies are still found",
            file=sys.stderr,
        )
    leak = summary["cross_split"]
    if leak["groups"]:
        print(
            f"warning: {leak['groups']} near-duplicate groups ({leak['images']} images; exact copies: "
            f"{leak['exact']}) span the splits the source gives; they stay where they are, so val and test scores "
            f"may be optimistic (kind cross_split in {PREPARED_DIR / 'duplicates.csv'})",
            file=sys.stderr,
        )
    print(
        f"prepare: {found.described}: {summary['images']} images in {summary['classes']} classes "
        f"({', '.join(f'{s} {n}' for s, n in summary['per_split'].items())}); "
        f"{summary['quarantined']} quarantined (see {PREPARED_DIR / 'quarantine.csv'}), "
        f"{summary['duplicates_dropped']} exact duplicates dropped, "
        f"{summary['near_duplicate_groups']} near-duplicate groups, {summary['ignored_files']} files ignored "
        f"(see {PREPARED_DIR / 'ignored.csv'}), {summary['colour_profiles']['converted']} colour profiles converted "
        "to sRGB"
    )


if __name__ == "__main__":
    run_stage(main)
