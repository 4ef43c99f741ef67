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
  quarantined (``missing file``, ``empty label``, ``bad label`` (``.`` or ``..`` parts, a leading
  ``/``, control characters), ``unknown split``, ``listed twice`` (the first row counts),
  ``malformed row``); files it does not list are ignored.

Folder names (and table labels) that differ only in their Unicode form (``café`` as NFC or as
NFD, the way macOS writes it) are one name to Unicode and to macOS, so they are one class: a
warning names the folders merged. Classes whose names differ only in case stay apart, with a
warning (a case-insensitive file system would merge their folders).

Ignored, each listed by name with its reason in ``ignored.csv`` (in ``labels_csv`` a listed file
is used whatever its name): hidden files and everything in hidden folders (a name starting with
``.``: ``.ipynb_checkpoints``, ``.git``, ``.DS_Store``; and ``__MACOSX``), symlinked folders (not
followed), anything but regular files (FIFOs, broken links), files without an image suffix
(pipeline/images.py IMAGE_SUFFIXES; licences and readmes, ``LICENSE``, ``LICENSE.txt``,
``README.md``..., get their own reason), and files outside the class folders.

Outputs in ``data/prepared/``:
- ``images/<class>/<hash>.jpg``: every usable image decoded once (JPEG, PNG, GIF first frame, BMP,
  WebP, TIFF), EXIF-rotated, sRGB (embedded colour profiles converted, alpha composited onto
  white, 16-bit and float pixels scaled to 8 bits: pipeline/images.py), longest side
  at most ``prepare.max_side``, re-encoded as JPEG so later stages decode fast. ``<class>`` is the
  label with each ``/`` written ``__``, so that it is one folder;
- ``manifest.csv``: path, label, split, sha256 (of the decoded pixels), width, height (of the
  upright source image), source (its path in ``data/raw``);
- ``labels.json``: the class names, list index = class index;
- ``quarantine.csv``: source, reason for every candidate image not used: unreadable, truncated,
  not an image, too small (``prepare.min_side``), decompression bomb, pixel values out of range
  (float or 32-bit pixels outside 0..1, 0..255 or 0..65535), label conflict (the same
  image in two classes: every copy is excluded), or a bad row of the labels table. Nothing in
  ``data/raw`` is deleted;
- ``ignored.csv``: source, reason for every file ignored (see above, or not listed in the table);
- ``duplicates.csv``: source, label, kind, same_as: ``exact`` copies (dropped, the first source
  is kept) and ``near`` duplicates (perceptual hash within ``prepare.near_duplicate_distance``
  bits: kept, but the whole group lands in one split, so test never holds a near-copy of a
  training image). ``cross_split``: a near-duplicate or exact copy that the source put in another
  split than ``same_as``; it is kept there (an exact copy once per split, sharing one file);
- ``reports/data.json`` (DVC metrics): layout, splits given, counts per class and split,
  quarantined (by reason), duplicates, near-duplicate groups, ``cross_split`` (groups spanning
  splits, their images, and pictures exactly alike in two splits: leakage, also a warning line),
  ignored files (by reason), colour profiles converted and unusable (those pixels are taken as sRGB,
  and a note names the files).

Splits given by the source are kept. The others (all three for class folders or a table without
split cells) are drawn from the images given ``train`` or no split, stratified: within each class,
near-duplicate groups are ordered by a key hashed from the seed and the image content (not the file
name or the other images), and of its n images the first ``round(n * prepare.split.val)`` go to val
(when val is drawn), the next ``round(n * prepare.split.test)`` to test (when drawn), the rest to
train. ``data.max_per_class`` keeps that many per class and given split, the first by that key.
Same inputs and seed give a byte-identical manifest; adding k images to a class changes the split
of at most 2k of its existing images (those at the two boundaries), and no image of another class.
"""

import csv
import hashlib
import os
import shutil
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate, count
from pathlib import Path, PurePosixPath

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from pipeline.cli import UserError, run_stage
from pipeline.config import Config, PrepareParams, SplitParams, load_config
from pipeline.data import (
    DATA_REPORT,
    JPEG_QUALITY,
    LABELS_TABLE,
    PREPARED_DIR,
    PREPARED_LABELS,
    PREPARED_MANIFEST,
    RAW_DIR,
    SPLIT_NAMES,
    SPLITS,
    PreparedImage,
    write_manifest,
    write_rows,
)
from pipeline.files import atomic_dir, readable, write_json
from pipeline.images import FORMATS, IMAGE_SUFFIXES, Unconvertible, decode

DOCUMENT_STEMS = {"LICENSE", "LICENCE", "COPYING", "NOTICE", "README"}  # LICENSE, license.txt, README.md...
IMBALANCE_WARNING = 10  # warn when the largest class has more than this many times the smallest's images
HELD_OUT = ("val", "test")  # the splits drawn from train when the source does not give them
SHOWN = 10  # how many classes or folders a message names before "and N more"


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
    profile: str  # what became of its colour profile: "", "converted" or "unusable: <why>" (images.to_rgb)
    given: str = ""  # the split the source gives it, "" for none
    rank: str = ""
    split: str = ""

    @property
    def path(self) -> str:
        return f"images/{folder_name(self.label)}/{self.sha256[:20]}.jpg"

    def row(self) -> PreparedImage:
        return PreparedImage(self.path, self.label, self.split, self.sha256, self.width, self.height, self.source)

    @property
    def held_out(self) -> str:
        """The val or test split the source gives it, else "": then this stage draws its split."""
        return self.given if self.given in HELD_OUT else ""


@dataclass
class Found:
    """What ``data/raw`` holds: its layout, the classes, the candidate images and the files left out."""

    layout: str  # class_folders | split_folders | labels_csv
    described: str  # the layout and what the label is, for the summary line
    classes: list[str]
    candidates: list[tuple[str, Path, str]]  # (label, file, split the source gives it or "")
    ignored: list[tuple[str, str, str]]  # (source, why, the label of the class folder it is in or "")
    given: tuple[str, ...] = ()  # the splits the source gives, in SPLITS order
    bad_rows: list[tuple[str, str]] = field(default_factory=list)  # the labels table's, as quarantine entries
    merged: dict[str, list[str]] = field(default_factory=dict)  # label -> the Unicode forms it was written in


class Quarantined(Exception):
    """An image that cannot be used; the message is the reason recorded in quarantine.csv."""


def folder_name(label: str) -> str:
    """``label`` as one folder name: labels from ``data.class_depth`` or a table may hold a ``/``."""
    return label.replace("/", "__")


def named(items: list[str]) -> str:
    """The first SHOWN items, and how many more there are."""
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


# --- Finding the images -----------------------------------------------------------------------


def find_images(raw: Path, depth: int) -> Found:
    """The layout of ``raw`` (see the module docstring) and what it holds."""
    folders, files = listing(raw)
    if (raw / LABELS_TABLE.name).is_file():
        return from_table(raw, files)
    top = [f.name for f in folders if len(f.parts) == 1]
    splits = {name: SPLIT_NAMES[name.lower()] for name in top if name.lower() in SPLIT_NAMES}
    if not splits:
        return from_class_folders(folders, files, depth)
    others = [readable(name) for name in top if name not in splits]
    if others:
        raise UserError(f"{raw} mixes split folders ({named(list(splits))}) with other folders ({named(others)}): "
                        "put every class folder inside the split folders (a class named like a split: rename it)")
    return from_split_folders(folders, files, depth, splits)


def listing(raw: Path) -> tuple[list[Path], dict[Path, str | None]]:
    """The folders below ``raw`` that may be classes, and every file with why it is ruled out
    (None: a candidate).

    Symlinked folders are not followed (a link loop would never end): they are listed as ruled out.
    """
    folders, files = [], {}
    for folder, dirs, names in os.walk(raw):
        dirs.sort()
        relative = Path(folder).relative_to(raw)
        for name in dirs:
            path = relative / name
            if (raw / path).is_symlink():
                files[path] = "symlinked folder: not followed (a link may loop)"
            elif hidden_in(path) is None:
                folders.append(path)
        for name in sorted(names):
            files[relative / name] = file_problem(raw, relative / name)
    return folders, files


def hidden_in(path: Path) -> Path | None:
    """The first part of ``path`` that is hidden (``.name``, or ``__MACOSX``), or None."""
    depth = next((i for i, name in enumerate(path.parts) if name.startswith(".") or name == "__MACOSX"), None)
    return None if depth is None else Path(*path.parts[:depth + 1])


def file_problem(raw: Path, path: Path) -> str | None:
    """Why the file at ``path`` (below ``raw``) is no candidate image, or None."""
    hidden = hidden_in(path)
    if hidden == path:
        return "hidden: the name starts with '.'"
    if hidden:
        return f"hidden: in the hidden folder {readable(str(hidden))}/"
    if not (raw / path).is_file():
        return "not a regular file: a broken link, FIFO, socket or device"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        if path.name.split(".")[0].upper() in DOCUMENT_STEMS:
            return "licence or readme"
        return f"not an image file name: suffix '{readable(path.suffix)}'" if path.suffix else \
            "not an image file name: no suffix"
    return None


def label_of(folders: tuple[str, ...]) -> str:
    """The label of a class folder: its path below the class root, each name NFC-normalized."""
    return "/".join(unicodedata.normalize("NFC", readable(name)) for name in folders)


def merged_forms(names: list[str]) -> dict[str, list[str]]:
    """The labels written in more than one Unicode form among ``names`` (folder paths or table
    labels): label -> those forms."""
    forms: dict[str, set[str]] = defaultdict(set)
    for name in names:
        forms[unicodedata.normalize("NFC", name)].add(name)
    return {label: sorted(written) for label, written in sorted(forms.items()) if len(written) > 1}


def outside_classes(parts: tuple[str, ...], depth: int) -> str | None:
    """Why a file at ``parts`` below the class root is in no class folder, or None when it is in one."""
    if len(parts) > depth:
        return None
    return "outside the class folders: " + ("no class folder above it" if depth == 1 else
                                            f"fewer than data.class_depth={depth} folders above it")


def label_rule(depth: int) -> str:
    return "top folder" if depth == 1 else f"top {depth} folder levels (a/b)"


def drawn_from_train(given: tuple[str, ...]) -> str:
    drawn = [split for split in HELD_OUT if split not in given]
    return f" ({' and '.join(drawn)} drawn from train)" if given and drawn else ""


def from_class_folders(folders: list[Path], files: dict[Path, str | None], depth: int) -> Found:
    candidates, ignored = [], []
    for path, problem in files.items():
        problem = problem or outside_classes(path.parts, depth)
        label = label_of(path.parts[:depth]) if len(path.parts) > depth else ""
        if problem:
            ignored.append((readable(str(path)), problem, label))
        else:
            candidates.append((label, RAW_DIR / path, ""))
    classes = [f for f in folders if len(f.parts) == depth]
    return Found("class_folders", f"class folders, label = {label_rule(depth)}",
                 sorted({label_of(f.parts) for f in classes}), candidates, ignored,
                 merged=merged_forms([readable(f.as_posix()) for f in classes]))


def from_split_folders(folders: list[Path], files: dict[Path, str | None], depth: int,
                       split_of: dict[str, str]) -> Found:
    """Class folders inside each split folder (``split_of``: folder name -> split)."""
    order = sorted(split_of, key=lambda name: SPLITS.index(split_of[name]))
    for split in SPLITS:
        twins = [name for name in order if split_of[name] == split]
        if len(twins) > 1:
            raise UserError(f"{RAW_DIR} has {len(twins)} folders for the {split} split ({', '.join(twins)}): "
                            "merge them into one")
    if "train" not in split_of.values():
        raise UserError(f"{RAW_DIR} has split folders ({', '.join(order)}) but no train folder: "
                        "add train/ holding the class folders to train on")
    classes = [f for f in folders if len(f.parts) == depth + 1 and f.parts[0] in split_of]
    classes_in = {name: {label_of(f.parts[1:]) for f in classes if f.parts[0] == name} for name in order}
    check_same_classes(classes_in)

    candidates, ignored = [], []
    for path, problem in files.items():
        inside = path.parts[0] in split_of and len(path.parts) > 1
        problem = problem or (outside_classes(path.parts[1:], depth) if inside else "outside the split folders")
        label = label_of(path.parts[1:depth + 1]) if inside and len(path.parts) > depth + 1 else ""
        if problem:
            ignored.append((readable(str(path)), problem, label))
        else:
            candidates.append((label, RAW_DIR / path, split_of[path.parts[0]]))
    given = tuple(split_of[name] for name in order)
    described = (f"split folders {', '.join(name + '/' for name in order)}{drawn_from_train(given)}, "
                 f"label = {label_rule(depth)} inside each")
    return Found("split_folders", described, sorted(classes_in[order[0]]), candidates, ignored, given,
                 merged=merged_forms([readable(Path(*f.parts[1:]).as_posix()) for f in classes]))


def check_same_classes(classes_in: dict[str, set[str]]) -> None:
    every = set().union(*classes_in.values())
    gaps = [(label, folder) for folder, labels in classes_in.items() for label in sorted(every - labels)]
    if gaps:
        label, lacking = gaps[0]
        having = next(folder for folder, labels in classes_in.items() if label in labels)
        more = f" (other gaps: {len(gaps) - 1})" if len(gaps) > 1 else ""
        raise UserError(f"class '{label}' is in {RAW_DIR}/{having}/ but not in {RAW_DIR}/{lacking}/{more}: "
                        f"every split folder needs the same class folders; add it to {lacking}/ or remove it")


def from_table(raw: Path, files: dict[Path, str | None]) -> Found:
    """The files the labels table lists, with its labels and splits (see the module docstring)."""
    with open(raw / LABELS_TABLE.name, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    at = header.index("path")
    candidates, bad_rows, listed, mentioned, written_labels = [], [], {}, set(), []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        written = row[at].strip() if len(row) > at else ""
        path = file_in(raw, written)
        mentioned.add(path)  # a file on a bad row is quarantined with the row, not ignored
        entry = table_row(header, row, written, path, f"row {number} of data.labels", listed)
        if isinstance(entry, str):
            bad_rows.append((written or f"(row {number})", entry))
        else:
            listed[path] = number
            candidates.append(entry)
            written_labels.append(row[header.index("label")].strip())
    ignored = [(readable(str(path)), problem or "not listed in data.labels", "") for path, problem in files.items()
               if raw / path not in mentioned and path != Path(LABELS_TABLE.name)]
    given = tuple(split for split in SPLITS if any(entry[2] == split for entry in candidates))
    column = f", splits from its split column{drawn_from_train(given)}" if given else ""
    return Found("labels_csv", f"labels from data.labels{column}", sorted({entry[0] for entry in candidates}),
                 candidates, ignored, given, bad_rows, merged_forms(written_labels))


def table_row(header: list[str], row: list[str], written: str, path: Path | None, where: str,
              listed: dict[Path, int]) -> tuple[str, Path, str] | str:
    """(label, file, given split) of one row of the labels table, or why the row cannot be used."""
    if len(row) != len(header):
        return f"malformed row: {where} has {len(row)} fields, its header {len(header)}"
    cells = dict(zip(header, (cell.strip() for cell in row)))
    label, split = unicodedata.normalize("NFC", cells["label"]), cells.get("split", "").lower()
    if path is None:
        return f"missing file: {where} names {written!r}, which is not a file in the source"
    if path in listed:
        return f"listed twice: {where} names the file of row {listed[path]}"
    if not label:
        return f"empty label: {where} has no label"
    if unusable(label):
        return f"bad label: {where} has {label!r}, which has '.' or '..' parts, a leading '/' or control characters"
    if split not in SPLIT_NAMES and split:
        return f"unknown split: {where} has {cells['split']!r}; use train, val (valid, validation), test or nothing"
    return label, path, SPLIT_NAMES.get(split, "")


def file_in(raw: Path, path: str) -> Path | None:
    """The file ``path`` (relative to ``raw``) names, as ``raw / <its canonical path>``, or None."""
    root = raw.resolve()
    try:
        real = (raw / path).resolve()
        inside = bool(path) and not PurePosixPath(path).is_absolute() and real.is_relative_to(root) and real.is_file()
    except OSError:  # a name too long for the file system, say: no file either
        return None
    return raw / real.relative_to(root) if inside else None


def unusable(label: str) -> bool:
    """Labels that are no path below a folder: later stages write images to <split>/<label>/ too."""
    return (label.startswith("/") or any(part in (".", "..") for part in label.split("/"))
            or any(unicodedata.category(char) == "Cc" for char in label))


# --- Decoding each image once -----------------------------------------------------------------


def normalize(job: tuple[Path, Path, PrepareParams]) -> dict | str:
    """Decode one file and write its normalized JPEG to ``pending``: its facts, or why it is quarantined."""
    path, pending, params = job
    try:
        image, profile = decode(path, at_least(params.min_side))
    except Quarantined as why:
        return str(why)
    except Exception as err:  # Pillow raises many types for broken files; each is quarantined
        return reason(err, path)
    pixels = np.asarray(image)
    sha256 = hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
    image.thumbnail((params.max_side, params.max_side), Image.Resampling.LANCZOS)
    image.save(pending, "JPEG", quality=JPEG_QUALITY)
    return {"sha256": sha256, "width": pixels.shape[1], "height": pixels.shape[0],
            "phash": int(str(imagehash.phash(image)), 16), "profile": profile}


def at_least(min_side: int) -> Callable[[Image.Image], None]:
    """A check for images.decode: quarantine images whose shorter side is below ``min_side``."""

    def check(image: Image.Image) -> None:
        if min(image.size) < min_side:
            raise Quarantined(f"too small: {image.width}x{image.height} pixels, below prepare.min_side={min_side}")

    return check


def reason(err: Exception, path: Path) -> str:
    """A one-line quarantine reason, starting with a keyword the data report counts by."""
    message = " ".join(str(err).split())
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {message}"
    if isinstance(err, Unconvertible):
        return message  # "pixel values out of range: ..."
    if isinstance(err, UnidentifiedImageError):
        with open(path, "rb") as fh:
            head = fh.read(16)
        return "empty file" if not head else f"not an image: a {'/'.join(FORMATS)} file does not start with {head!r}"
    if isinstance(err, OSError) and "truncated" in message:
        return f"truncated: {message}"
    return f"unreadable: {type(err).__name__}: {message}"


def source_of(path: Path) -> str:
    """How quarantine.csv, ignored.csv and the manifest name a file: its path in data/raw."""
    return readable(str(path.relative_to(RAW_DIR)))


def decode_all(candidates: list[tuple[str, Path, str]], pending: Path,
               cfg: Config) -> tuple[list[Record], list[tuple]]:
    pending.mkdir()
    jobs = [(path, pending / f"{i}.jpg", cfg.prepare) for i, (_, path, _) in enumerate(candidates)]
    with ProcessPoolExecutor() as pool:
        results = list(tqdm(pool.map(normalize, jobs, chunksize=16), total=len(jobs), desc="prepare", disable=None))
    images, quarantine = [], []
    for (label, path, given), (_, pending_file, _), result in zip(candidates, jobs, results):
        source = source_of(path)
        if isinstance(result, str):
            quarantine.append((source, result))
        else:
            rank = hashlib.sha256(f"{cfg.seed}:{result['sha256']}".encode()).hexdigest()
            images.append(Record(source, label, pending=pending_file, given=given, rank=rank, **result))
    return images, quarantine


# --- Duplicates -------------------------------------------------------------------------------


def drop_exact_duplicates(images: list[Record]) -> tuple[list[Record], list[tuple], list[list]]:
    """One copy of identical images per given split; images found under two classes are label
    conflicts, all excluded."""
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
            continue
        first: dict[str, Record] = {}  # by held-out split: copies in two given splits are both kept
        for copy in copies:
            original = first.setdefault(copy.held_out, copy)
            if original is copy:
                kept.append(copy)
            else:
                duplicates.append([copy.source, copy.label, "exact", original.source])
    return kept, conflicts, duplicates


def cap_per_class(images: list[Record], cap: int | None) -> list[Record]:
    """At most ``cap`` images per class and given split (``data.max_per_class``), the first by rank."""
    if cap is None:
        return images
    by_class: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for image in sorted(images, key=lambda i: i.rank):
        by_class[image.label, image.held_out].append(image)
    return [image for members in by_class.values() for image in members[:cap]]


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
    return [[i.source, i.label, "near" if i.split == group[0].split else "cross_split", group[0].source]
            for group in groups for i in group[1:]]


def cross_split(groups: list[list[Record]]) -> dict[str, int]:
    """Leakage the source's own split brings: near-duplicate groups (exact copies included) spanning
    splits, their images, and pictures exactly alike in two splits. Drawn splits never do this."""
    spanning = [g for g in groups if len({i.split for i in g}) > 1]
    splits_of: dict[str, set[str]] = defaultdict(set)
    for image in (i for g in spanning for i in g):
        splits_of[image.sha256].add(image.split)
    return {"groups": len(spanning), "images": sum(len(g) for g in spanning),
            "exact": sum(len(splits) > 1 for splits in splits_of.values())}


# --- Splitting --------------------------------------------------------------------------------


def assign_splits(groups: list[list[Record]], given: tuple[str, ...], split: SplitParams) -> None:
    """Given val and test are kept; the held-out splits not given are drawn from the other images,
    stratified by class, one split per near-duplicate group, in the order of the groups' rank keys.

    A group counts towards the class of its first member (by rank), so that near-duplicates in
    two classes still share a split.
    """
    drawn = {name: getattr(split, name) for name in HELD_OUT if name not in given}
    by_label: dict[str, list[list[Record]]] = defaultdict(list)
    for group in groups:
        for image in group:
            image.split = image.held_out
        pool = [image for image in group if not image.held_out]
        if pool:
            by_label[pool[0].label].append(pool)
    for members in by_label.values():
        members.sort(key=lambda g: g[0].rank)
        n = sum(len(g) for g in members)
        bounds = list(zip(drawn, accumulate(round(n * fraction) for fraction in drawn.values())))
        taken = 0
        for group in members:
            chosen = next((name for name, bound in bounds if taken < bound), "train")
            for image in group:
                image.split = chosen
            taken += len(group)


def check_enough_classes(found: Found) -> None:
    if len(found.classes) >= 2:
        return
    if found.layout != "labels_csv":
        raise UserError(f"{RAW_DIR} has {len(found.classes)} class folder(s) {found.classes}; need at least 2 "
                        "(one sub-folder of images per class)")
    first_bad = f"; {len(found.bad_rows)} bad rows, the first: {found.bad_rows[0][1]}" if found.bad_rows else ""
    raise UserError(f"data.labels names {len(found.classes)} class(es) {found.classes} on usable rows; "
                    f"need at least 2{first_bad}")


def count_per_class(classes: list[str], images: list[Record]) -> dict[str, dict[str, int]]:
    counts = Counter((i.label, i.split) for i in images)
    return {label: {split: counts[label, split] for split in SPLITS} for label in classes}


def unused_files(found: Found, quarantine: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """The files ignored or quarantined in each class folder (or on each label's table rows):
    label -> [(source, why)], sorted."""
    label_at = {source_of(path): label for label, path, _ in found.candidates}
    unused = defaultdict(list)
    for source, why, label in found.ignored:
        unused[label].append((source, why))
    for source, why in quarantine:
        unused[label_at.get(source, "")].append((source, why))
    return {label: sorted(files) for label, files in unused.items()}


def check_classes(per_class: dict[str, dict[str, int]], given: tuple[str, ...], split: SplitParams,
                  unused: dict[str, list[tuple[str, str]]]) -> None:
    """Every split needs an image of every class; the refusal says for each class too small what
    was left out of it (nothing is written then, so ignored.csv and quarantine.csv cannot)."""
    small = [label for label, counts in per_class.items() if min(counts.values()) == 0]
    if small:
        fractions = [getattr(split, name) for name in HELD_OUT if name not in given]
        pool = " in train" if given else ""
        need = f"; each class needs at least {smallest_class(fractions)}{pool}" if fractions else ""

        def left_out(label: str) -> str:
            files = unused.get(label, [])
            return f"; {len(files)} files not used, the first: {files[0][0]}: {files[0][1]}" if files else ""

        shown = named([f"'{label}' ({', '.join(f'{s} {n}' for s, n in per_class[label].items())}{left_out(label)})"
                       for label in small])
        raise UserError(
            f"too few usable images to put one in each of train, val and test in {len(small)} of {len(per_class)} "
            f"classes (prepare.split val {split.val}, test {split.test}; near-duplicates count as one{need}): "
            f"{shown}: add images or remove those classes"
        )
    sizes = {label: sum(counts.values()) for label, counts in per_class.items()}
    largest, smallest = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
    if sizes[largest] > IMBALANCE_WARNING * sizes[smallest]:
        print(f"warning: classes are heavily imbalanced: '{largest}' has {sizes[largest]} images, "
              f"'{smallest}' only {sizes[smallest]}", file=sys.stderr)


def smallest_class(fractions: list[float]) -> int:
    """The fewest images from which each drawn split gets one and train keeps at least one."""
    return next(n for n in count(1)
                if all(round(n * f) >= 1 for f in fractions) and n > sum(round(n * f) for f in fractions))


# --- Outputs ----------------------------------------------------------------------------------


def move_into_place(images: list[Record], out: Path) -> None:
    for image in images:
        (out / image.path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(image.pending, out / image.path)  # exact copies in two given splits: the same bytes twice


def by_reason(reasons: list[str]) -> dict[str, int]:
    """How many of each kind: the words before the first colon."""
    return dict(sorted(Counter(r.split(":")[0] for r in reasons).items()))


def report(found: Found, images: list[Record], per_class: dict, quarantine: list[tuple], exact: list[list],
           groups: list[list[Record]], leakage: dict[str, int]) -> dict:
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
        "cross_split": leakage,
        "ignored_files": len(found.ignored),
        "ignored_by_reason": by_reason([r for _, r, _ in found.ignored]),
        "colour_profiles": {"converted": sum(i.profile == "converted" for i in images),
                            "unusable": sum(i.profile.startswith("unusable") for i in images)},
    }


def warn_about_names(found: Found) -> None:
    """Class names that look alike: merged Unicode forms (one class), names apart only by case (two)."""
    if found.merged:
        merges = [f"'{label}' from {' and '.join(ascii(form) for form in forms)}"
                  for label, forms in found.merged.items()]
        print(f"warning: {len(merges)} class(es) merge names that differ only in their Unicode form (NFC/NFD, one "
              f"name to Unicode and to macOS): {named(merges)}; rename one if they are different classes",
              file=sys.stderr)
    cases = defaultdict(list)
    for label in found.classes:
        cases[label.casefold()].append(label)
    alike = [" and ".join(f"'{label}'" for label in labels) for labels in cases.values() if len(labels) > 1]
    if alike:
        print(f"warning: {len(alike)} group(s) of classes differ only in case and stay apart: {named(alike)} (a "
              "case-insensitive file system, macOS or Windows, would merge their folders)", file=sys.stderr)


def note_unusable_profiles(images: list[Record]) -> None:
    unusable = sorted((i.source, i.profile) for i in images if i.profile.startswith("unusable"))
    if unusable:
        print(f"note: {len(unusable)} images have a colour profile that cannot be used (the first: "
              f"{unusable[0][1].removeprefix('unusable: ')}); "
              f"their pixels are taken as sRGB: {named([source for source, _ in unusable])}", file=sys.stderr)


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
        groups = near_duplicate_groups(images, cfg.prepare.near_duplicate_distance)
        assign_splits(groups, found.given, cfg.prepare.split)
        per_class = count_per_class(found.classes, images)
        check_classes(per_class, found.given, cfg.prepare.split, unused_files(found, quarantine))
        move_into_place(images, out)
        shutil.rmtree(out / ".pending")  # the normalized copies of duplicates and excluded images
        images.sort(key=lambda i: (i.split, i.label, i.path))
        write_rows(out / PREPARED_MANIFEST.name, PreparedImage, [i.row() for i in images])
        write_manifest(out / "quarantine.csv", ["source", "reason"], sorted(quarantine))
        write_manifest(out / "ignored.csv", ["source", "reason"], sorted((s, r) for s, r, _ in found.ignored))
        write_manifest(out / "duplicates.csv", ["source", "label", "kind", "same_as"],
                       sorted(exact + near_duplicate_rows(groups)))
        write_json(out / PREPARED_LABELS.name, found.classes)
    summary = report(found, images, per_class, quarantine, exact, groups, cross_split(groups))
    write_json(DATA_REPORT, summary)
    note_unusable_profiles(images)
    leak = summary["cross_split"]
    if leak["groups"]:
        print(f"warning: {leak['groups']} near-duplicate groups ({leak['images']} images; exact copies: "
              f"{leak['exact']}) span the splits the source gives; they stay where they are, so val and test scores "
              f"may be optimistic (kind cross_split in {PREPARED_DIR / 'duplicates.csv'})", file=sys.stderr)
    print(f"prepare: {found.described}: {summary['images']} images in {summary['classes']} classes "
          f"({', '.join(f'{s} {n}' for s, n in summary['per_split'].items())}); "
          f"{summary['quarantined']} quarantined (see {PREPARED_DIR / 'quarantine.csv'}), "
          f"{summary['duplicates_dropped']} exact duplicates dropped, "
          f"{summary['near_duplicate_groups']} near-duplicate groups, {summary['ignored_files']} files ignored "
          f"(see {PREPARED_DIR / 'ignored.csv'}), {summary['colour_profiles']['converted']} colour profiles converted "
          "to sRGB")


if __name__ == "__main__":
    run_stage(main)
