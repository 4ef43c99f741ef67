"""The ``data.labels`` table (``path,label[,split]``): read, checked, and copied into ``data/raw``
with paths relative to it."""

import csv
from pathlib import Path, PurePosixPath

from pipeline.cli import UserError
from pipeline.data.manifests import write_manifest
from pipeline.paths import LABELS_COLUMNS, LABELS_TABLE

# --- The labels table -------------------------------------------------------------------------


def read_labels(table: Path) -> list[list[str]]:
    """The rows of the data.labels table, header first, checked before anything is downloaded."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: spreadsheets add a BOM
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise UserError(f"data.labels: {table} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"data.labels: {table} is a folder; set it to a CSV file") from None
    except UnicodeDecodeError:
        raise UserError(f"data.labels: {table} is not UTF-8 text: save it as a UTF-8 CSV file") from None
    except csv.Error as err:
        raise UserError(f"data.labels: {table} is not a readable CSV file ({err})") from None
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if not {"path", "label"} <= set(header) <= set(LABELS_COLUMNS) or len(set(header)) < len(header):
        found = f"starts with {','.join(rows[0])!r}" if rows else "is empty"
        raise UserError(
            f"data.labels: {table} {found}; its first row must name the columns path,label or "
            "path,label,split (paths relative to the source, e.g. daisy/1.jpg)"
        )
    return [header, *rows[1:]]


def write_labels(rows: list[list[str]], raw: Path, wrapper: Path) -> None:
    """The table into ``raw`` (LABELS_TABLE), each path as the prepare stage finds it there."""
    at = rows[0].index("path")
    for row in rows[1:]:
        if len(row) > at:
            row[at] = path_in_raw(row[at].strip(), raw, wrapper)
    write_manifest(raw / LABELS_TABLE.name, rows[0], rows[1:])


def path_in_raw(path: str, raw: Path, wrapper: Path) -> str:
    """``path`` without the skipped wrapping folder when only that form names a file in ``raw``."""
    parts, depth = PurePosixPath(path).parts, len(wrapper.parts)
    inner = PurePosixPath(*parts[depth:])
    if depth and parts[:depth] == wrapper.parts and not (raw / path).is_file() and (raw / inner).is_file():
        return inner.as_posix()
    return path
