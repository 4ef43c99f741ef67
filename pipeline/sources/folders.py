"""Copying a local source folder into ``data/raw``: links resolved or skipped and listed, a single
wrapping folder skipped, a wrapped dataset beside class folders refused."""

import shutil
import sys
from pathlib import Path

from pipeline.cli import UserError, redact_url
from pipeline.config import DataParams
from pipeline.files import readable
from pipeline.paths import SPLIT_NAMES

IGNORED_TOP_LEVEL = ("__MACOSX",)  # macOS zip metadata
NOTES = (".txt", ".md")  # files a wrapping folder may hold next to its folders (flower_photos/LICENSE.txt)
SHOWN = 5  # folders named in one message


# --- Local folders ----------------------------------------------------------------------------


def copy_folder(folder: Path, dest: Path, root: Path, skipped: list[dict], visiting: frozenset = frozenset()) -> None:
    """Copy ``folder`` into ``dest`` with links replaced by what they point to.

    Links are followed only while they stay inside ``root`` (the source folder). Links leading
    outside it, broken links, links back into a folder being copied or to themselves (loops) and
    special files are skipped and listed in ``skipped``.
    """
    for entry in sorted(folder.iterdir()):
        real, target = resolved(entry), dest / readable(entry.name)
        why = skip_reason(entry, real, root, visiting)
        if why or real is None:  # skip_reason names every unresolvable entry (None: a loop)
            skipped.append({"path": readable(str(entry.relative_to(root))), "reason": why or "a link loop"})
        elif real.is_dir():
            target.mkdir()
            copy_folder(entry, target, root, skipped, visiting | {real})
        else:
            shutil.copyfile(real, target)


def resolved(entry: Path) -> Path | None:
    """Where ``entry`` leads, or None for links that lead back to themselves (``a -> a``, ``a -> b -> a``)."""
    try:
        return entry.resolve()
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError("Symlink loop ..."), later ones OSError
        return None


def skip_reason(entry: Path, real: Path | None, root: Path, visiting: frozenset) -> str | None:
    if real is None:
        return "link loop (links that lead back to themselves)"
    if entry.is_symlink() and not real.is_relative_to(root):
        return f"link to {readable(str(real))}, outside the source folder"
    if not real.exists():
        return "broken link"
    if real.is_dir() and (real in visiting or entry.parent.resolve().is_relative_to(real)):
        return "link loop (points to a folder that contains it)"
    if not (real.is_dir() or real.is_file()):
        return "not a regular file or folder"
    return None


def dataset_root(folder: Path) -> Path:
    """Descend through a single wrapping folder (``flower_photos/``) to the class folders."""
    dirs = folders_in(folder)
    if len(dirs) == 1 and holds_only_folders(folder):
        return dataset_root(dirs[0])
    return folder


def visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` but the hidden ones prepare ignores too (``.DS_Store``, ``._x.jpg``,
    ``__MACOSX``: what macOS adds)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in IGNORED_TOP_LEVEL)


def folders_in(folder: Path) -> list[Path]:
    return [p for p in visible(folder) if p.is_dir() and not p.is_symlink()]


def holds_only_folders(folder: Path) -> bool:
    """Whether ``folder`` holds folders and nothing else but notes (LICENSE.txt): a dataset's wrapper."""
    entries = visible(folder)
    return any(p.is_dir() for p in entries) and all(p.is_dir() or p.suffix.lower() in NOTES for p in entries)


def check_one_dataset(top: Path, cfg: DataParams) -> None:
    """Several top folders where some hold only folders and others hold images look like several
    datasets side by side (a wrapped one next to class folders): stop, naming them. When every top
    folder holds only folders, the layout is the documented nested one (``dogs/husky``, labelled
    ``dogs``) or several wrapped datasets, which folders alone cannot tell apart: warn. Split
    folders, classes two levels down (``data.class_depth``) and a labels table say otherwise."""
    dirs = folders_in(top)
    if len(dirs) < 2 or cfg.labels or cfg.class_depth > 1 or any(p.name.lower() in SPLIT_NAMES for p in dirs):
        return
    wrapped = [p for p in dirs if holds_only_folders(p)]
    if wrapped and len(wrapped) < len(dirs):
        verb = "holds" if len(wrapped) == 1 else "hold"
        raise UserError(
            f"data.url: {redact_url(cfg.url)} holds several top folders ({folder_list(dirs)}), and "
            f"{folder_list(wrapped)} {verb} only folders, like a whole dataset: several datasets side "
            "by side? set data.url to the folder of the one to use (unpack an archive first) or repack "
            "it with its class folders at the top; if the folders inside are the classes, set "
            "data.class_depth: 2"
        )
    if wrapped:
        print(
            f"warning: data.url: every top folder of {redact_url(cfg.url)} ({folder_list(dirs)}) holds only "
            "folders: the labels are these top folders (data.class_depth: 1); if the folders inside them are "
            "the classes, set data.class_depth: 2, or if they are several datasets, set data.url to one",
            file=sys.stderr,
        )


def folder_list(folders: list[Path]) -> str:
    more = f" and {len(folders) - SHOWN} more" if len(folders) > SHOWN else ""
    return ", ".join(f"{readable(p.name)}/" for p in folders[:SHOWN]) + more
