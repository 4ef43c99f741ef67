"""Finding the images in ``data/raw``, whatever its layout (class folders, split folders, a labels
table), and the record of each usable image (pipeline.stages.prepare's docstring)."""

import csv
import os
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.cli import UserError
from pipeline.data.images import IMAGE_SUFFIXES
from pipeline.data.manifests import PreparedImage
from pipeline.files import readable
from pipeline.paths import (
    LABELS_TABLE,
    RAW_DIR,
    SPLIT_NAMES,
    SPLITS,
)

DOCUMENT_STEMS = {"LICENSE", "LICENCE", "COPYING", "NOTICE", "README"}  # LICENSE, license.txt, README.md...
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
    thumbnail: bytes = b""  # 32x32 grey levels, verifying near-duplicate hashes (dedupe.fingerprints)
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
        raise UserError(
            f"{raw} mixes split folders ({named(list(splits))}) with other folders ({named(others)}): "
            "put every class folder inside the split folders (a class named like a split: rename it)"
        )
    return from_split_folders(folders, files, depth, splits)


def listing(raw: Path) -> tuple[list[Path], dict[Path, str | None]]:
    """The folders below ``raw`` that may be classes, and every file with why it is ruled out
    (None: a candidate).

    Symlinked folders are not followed (a link loop would never end): they are listed as ruled out.
    """
    folders: list[Path] = []
    files: dict[Path, str | None] = {}
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
    return None if depth is None else Path(*path.parts[: depth + 1])


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
        return (
            f"not an image file name: suffix '{readable(path.suffix)}'"
            if path.suffix
            else "not an image file name: no suffix"
        )
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
    return "outside the class folders: " + (
        "no class folder above it" if depth == 1 else f"fewer than data.class_depth={depth} folders above it"
    )


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
    return Found(
        "class_folders",
        f"class folders, label = {label_rule(depth)}",
        sorted({label_of(f.parts) for f in classes}),
        candidates,
        ignored,
        merged=merged_forms([readable(f.as_posix()) for f in classes]),
    )


def from_split_folders(
    folders: list[Path], files: dict[Path, str | None], depth: int, split_of: dict[str, str]
) -> Found:
    """Class folders inside each split folder (``split_of``: folder name -> split)."""
    order = sorted(split_of, key=lambda name: SPLITS.index(split_of[name]))
    for split in SPLITS:
        twins = [name for name in order if split_of[name] == split]
        if len(twins) > 1:
            raise UserError(
                f"{RAW_DIR} has {len(twins)} folders for the {split} split ({', '.join(twins)}): merge them into one"
            )
    if "train" not in split_of.values():
        raise UserError(
            f"{RAW_DIR} has split folders ({', '.join(order)}) but no train folder: "
            "add train/ holding the class folders to train on"
        )
    classes = [f for f in folders if len(f.parts) == depth + 1 and f.parts[0] in split_of]
    classes_in = {name: {label_of(f.parts[1:]) for f in classes if f.parts[0] == name} for name in order}
    check_same_classes(classes_in)

    candidates, ignored = [], []
    for path, problem in files.items():
        inside = path.parts[0] in split_of and len(path.parts) > 1
        problem = problem or (outside_classes(path.parts[1:], depth) if inside else "outside the split folders")
        label = label_of(path.parts[1 : depth + 1]) if inside and len(path.parts) > depth + 1 else ""
        if problem:
            ignored.append((readable(str(path)), problem, label))
        else:
            candidates.append((label, RAW_DIR / path, split_of[path.parts[0]]))
    given = tuple(split_of[name] for name in order)
    described = (
        f"split folders {', '.join(name + '/' for name in order)}{drawn_from_train(given)}, "
        f"label = {label_rule(depth)} inside each"
    )
    return Found(
        "split_folders",
        described,
        sorted(classes_in[order[0]]),
        candidates,
        ignored,
        given,
        merged=merged_forms([readable(Path(*f.parts[1:]).as_posix()) for f in classes]),
    )


def check_same_classes(classes_in: dict[str, set[str]]) -> None:
    every = set().union(*classes_in.values())
    gaps = [(label, folder) for folder, labels in classes_in.items() for label in sorted(every - labels)]
    if gaps:
        label, lacking = gaps[0]
        having = next(folder for folder, labels in classes_in.items() if label in labels)
        more = f" (other gaps: {len(gaps) - 1})" if len(gaps) > 1 else ""
        raise UserError(
            f"class '{label}' is in {RAW_DIR}/{having}/ but not in {RAW_DIR}/{lacking}/{more}: "
            f"every split folder needs the same class folders; add it to {lacking}/ or remove it"
        )


def from_table(raw: Path, files: dict[Path, str | None]) -> Found:
    """The files the labels table lists, with its labels and splits (see the module docstring)."""
    with open(raw / LABELS_TABLE.name, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    at = header.index("path")
    listed: dict[Path, int]
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
            listed[entry[1]] = number  # the row's file
            candidates.append(entry)
            written_labels.append(row[header.index("label")].strip())
    ignored = [
        (readable(str(path)), problem or "not listed in data.labels", "")
        for path, problem in files.items()
        if raw / path not in mentioned and path != Path(LABELS_TABLE.name)
    ]
    given = tuple(split for split in SPLITS if any(entry[2] == split for entry in candidates))
    column = f", splits from its split column{drawn_from_train(given)}" if given else ""
    return Found(
        "labels_csv",
        f"labels from data.labels{column}",
        sorted({entry[0] for entry in candidates}),
        candidates,
        ignored,
        given,
        bad_rows,
        merged_forms(written_labels),
    )


def table_row(
    header: list[str], row: list[str], written: str, path: Path | None, where: str, listed: dict[Path, int]
) -> tuple[str, Path, str] | str:
    """(label, file, given split) of one row of the labels table, or why the row cannot be used."""
    if len(row) != len(header):
        return f"malformed row: {where} has {len(row)} fields, its header {len(header)}"
    cells = dict(zip(header, (cell.strip() for cell in row)))
    label, split = unicodedata.normalize("NFC", cells["label"]), cells.get("split", "").lower()
    if PurePosixPath(written).is_absolute():
        return (
            f"absolute path: {where} names {written!r}; absolute paths are not allowed: give the path relative "
            "to the source (e.g. daisy/1.jpg)"
        )
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
    return (
        label.startswith("/")
        or any(part in (".", "..") for part in label.split("/"))
        or any(unicodedata.category(char) == "Cc" for char in label)
    )


def source_of(path: Path) -> str:
    """How quarantine.csv, ignored.csv and the manifest name a file: its path in data/raw."""
    return readable(str(path.relative_to(RAW_DIR)))
