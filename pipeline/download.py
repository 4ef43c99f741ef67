"""Stage 1, download: fetch the image archive (or take a local folder) and extract it safely.

``data.url`` is an http(s):// or file:// URL of an archive, a local archive (.tgz, .tar.gz, .tar,
.zip; recognised by content, not by name), or a local folder (the prepare stage reads its layout).
``data.labels`` is null or the path of a local CSV table ``path,label[,split]`` naming the images.

Outputs:
- ``data/raw/``: the source's files, as in the source (a single wrapping folder such as
  ``flower_photos/`` is skipped). Only regular files and folders: links inside the source become
  copies of what they point to; names that are not valid UTF-8 get ``\\xNN`` escapes instead.
  Zip member names without the UTF-8 flag are read as UTF-8 when they are valid UTF-8 (most zip
  tools write them so), else as cp437 with a warning; ``\\`` in a zip name is a folder separator.
  Several top folders of which some, not all, hold only folders (a wrapped dataset next to class
  folders) stop the stage naming them; when all of them do, a warning says the labels are the top
  folders; neither applies to split folders, ``data.class_depth`` above 1 or ``data.labels``.
- ``data/raw/.labels.csv`` (with ``data.labels``): a copy of the table, so DVC versions it with
  the images. Its paths may be relative to the source's root (``flower_photos/daisy/1.jpg``) or to
  ``data/raw`` (``daisy/1.jpg``): a path that names no file but does once the skipped wrapping
  folder is taken off is rewritten that way; every other cell is copied as it is. A header other
  than the columns path, label and optionally split (any order and case) stops the stage.
- ``reports/download.json``: the source, the archive's sha256 (so ``dvc.lock`` pins exactly what
  was used even when ``data.sha256`` is null), the file and byte counts, every link skipped, and
  the labels table's path, sha256 and row count.

Downloads go to a per-user cache (``$PIPELINE_CACHE_DIR``, default ``~/.cache/transfer-pipeline``)
through a ``.part`` file that is renamed, once complete and an archive, to
``downloads/<url key>/<sha256>/<name>``: every archive a URL served is kept under its own hash, so a
wrong ``data.sha256`` never deletes one that matched before. The one ``data.sha256`` names (or,
when null, the latest) is used without any network access. Network errors are retried with backoff
and resume the ``.part`` with an HTTP Range request; after the last try the ``.part`` is kept so
that the next run resumes it. A ``.part`` that is not an archive (an error page) is deleted.
Credentials come from ``~/.netrc`` (or ``$NETRC``) or ``$PIPELINE_DATA_AUTH`` (an Authorization
header), never from params.yaml, as DVC writes params to ``dvc.lock``; any in ``data.url`` are
masked in what this stage writes and prints.

Extraction refuses absolute paths, ``..``, Windows drive letters, links pointing outside the
archive, device files and archives over ``data.max_files`` / ``data.max_bytes``, naming the bad
member. It writes into a temporary folder that replaces ``data/raw`` only on success. Reading a tar
archive on a Python older than the tarfile fixes of 2025 (TARFILE_FIXED) prints one warning.
"""

import csv
import glob
import hashlib
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, NoReturn
from urllib.parse import unquote, urlparse

import requests
import urllib3
from tqdm import tqdm

from pipeline.cli import OUT_OF_SPACE, UserError, redact_url, run_stage
from pipeline.config import DataParams, load_config
from pipeline.data import DOWNLOAD_REPORT, LABELS_COLUMNS, LABELS_TABLE, RAW_DIR, SPLIT_NAMES, write_manifest
from pipeline.files import atomic_dir, cache_root, readable, sha256_of, write_json

RETRIES = 4
RETRY_WAIT_S = 1.0  # doubles after each failed try
TIMEOUT_S = (10, 60)  # (connect, read)
CHUNK = 2**20
IGNORED_TOP_LEVEL = ("__MACOSX",)  # macOS zip metadata
NOTES = (".txt", ".md")  # files a wrapping folder may hold next to its folders (flower_photos/LICENSE.txt)
SHOWN = 5  # folders named in one message
AUTH_VARIABLE = "PIPELINE_DATA_AUTH"  # the Authorization header for data.url, e.g. "Bearer <token>"
ZIP_ENCRYPTED = 0x1  # general purpose flag bit 0: ZipCrypto or AES
ZIP_UTF8 = 0x800  # general purpose flag bit 11: the name is UTF-8 (else cp437, says the zip standard)
DRIVE = re.compile(r"[A-Za-z]:")  # C:/x.jpg, C:x.jpg: a Windows path, absolute or on another drive
# The first release of each Python line with tarfile's 2025 fixes for malicious archives: the
# extraction filter's (CVE-2025-4517, -4330, -4138, -4435, CVE-2024-12718: 3.9.23, 3.10.18, 3.11.13,
# 3.12.11, 3.13.4), which extract() does not use, and the header parser's (CVE-2025-8194, an endless
# loop on a negative offset), which it does. Lines from 3.14 on have them all.
TARFILE_FIXED = {(3, 9): 24, (3, 10): 19, (3, 11): 14, (3, 12): 12, (3, 13): 6}
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)  # what zipfile reads


def cache_dir() -> Path:
    return cache_root() / "downloads"


def local_source(url: str) -> Path | None:
    """The local path ``url`` names (plain path or file:// URL), or None for a remote URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise UserError(f"data.url: unsupported scheme '{parsed.scheme}://' (use http(s)://, file:// or a local path)")
    return Path(url).expanduser()


# --- Checksums and what a file is -------------------------------------------------------------


def verify(path: Path, expected: str | None, origin: str) -> str:
    """The sha256 of ``path``; fails naming both hashes when it is not ``expected`` (if set)."""
    actual = sha256_of(path)
    require_sha256(actual, expected, origin)
    return actual


def require_sha256(actual: str, expected: str | None, origin: str) -> None:
    if expected and actual != expected:
        raise UserError(
            f"sha256 mismatch for {origin}: expected data.sha256={expected}, got {actual} "
            "(wrong or changed archive: fix data.url, or set data.sha256 to the new hash if you trust it)"
        )


def archive_format(path: Path, origin: str) -> str:
    """'tar' or 'zip' by content; anything else fails saying what the file actually is."""
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise UserError(f"data.url: {origin} is not a tar or zip archive: it is {file_kind(path)}")


def file_kind(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(512)
    text = head.lstrip().lower()
    if not head:
        return "an empty file"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        return "an HTML page (an error or login page saved under the archive's name?)"
    if head.startswith(b"PK\x03\x04"):
        return "a damaged or truncated zip archive"
    for magic, kind in ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ", "xz")):
        if head.startswith(magic):
            return f"{kind}-compressed data that is not a complete tar archive (truncated?)"
    return f"unknown data starting with {head[:16]!r}"


# --- Downloading ------------------------------------------------------------------------------


class Retryable(Exception):
    """A failed attempt worth repeating: network trouble, a server error, an incomplete body."""


def fetch(url: str, expected: str | None) -> tuple[Path, str]:
    """The archive at ``url`` in the cache, downloading it only if needed, and its sha256."""
    name = PurePosixPath(unquote(urlparse(url).path)).name or "download"
    folder = cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16]
    shown = redact_url(url)
    cached = cached_archive(folder, name, expected)
    if cached:
        print(f"download: using cached {cached} (no network access)")
        return cached, cached.parent.name
    if expected and (others := sorted(p.parent.name for p in folder.glob(f"*/{glob.escape(name)}"))):
        print(f"download: no cached archive from {shown} has data.sha256={expected} (cached: {', '.join(others)}); "
              "downloading again", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{name}.part"
    download_with_retries(url, part)
    try:
        archive_format(part, shown)
    except UserError:
        part.unlink()  # an error page, not the archive: resuming it would only repeat the failure
        raise
    actual = sha256_of(part)
    target = folder / actual / name
    target.parent.mkdir(exist_ok=True)
    part.rename(target)  # kept even when data.sha256 names another: setting it to this hash then works offline
    require_sha256(actual, expected, shown)
    return target, actual


def cached_archive(folder: Path, name: str, expected: str | None) -> Path | None:
    """The intact cached download ``expected`` names, or with null the latest one."""
    if expected:
        candidates = [folder / expected / name]
    else:
        candidates = sorted(folder.glob(f"*/{glob.escape(name)}"), key=lambda p: p.stat().st_mtime)[-1:]
    return next((p for p in candidates if p.is_file() and sha256_of(p) == p.parent.name), None)


def download_with_retries(url: str, part: Path) -> None:
    for attempt in range(1, RETRIES + 1):
        try:
            download_into(url, part)
            return
        except (requests.RequestException, urllib3.exceptions.HTTPError, Retryable) as err:
            problem = str(err) if isinstance(err, Retryable) else type(err).__name__
            if attempt == RETRIES:
                kept = f"; the partial file {part} is kept and resumes next run" if part.exists() else ""
                raise UserError(
                    f"could not download data.url {redact_url(url)} ({problem}) after {RETRIES} tries{kept}; "
                    "offline? set data.url to a local archive or folder, e.g. data.url=/path/to/flower_photos.tgz"
                ) from None
            wait = RETRY_WAIT_S * 2 ** (attempt - 1)
            print(f"download: {problem}; retrying in {wait:g}s ({attempt}/{RETRIES})", file=sys.stderr)
            time.sleep(wait)


def download_into(url: str, part: Path) -> None:
    """Fetch ``url`` into ``part``, continuing after the bytes already there when the server allows."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    # Without an auth, requests uses ~/.netrc ($NETRC), and again after a redirect to another host.
    with requests.get(url, headers=headers, auth=auth_from_environment(), stream=True, timeout=TIMEOUT_S) as response:
        if response.status_code == 416 and response.headers.get("Content-Range") == f"bytes */{have}":
            return  # the .part already holds the whole file (an earlier run stopped before renaming it)
        if response.status_code == 416:  # the .part is longer than what the server has now
            part.unlink()
            raise Retryable("server refused to resume; starting over")
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise Retryable(f"server answered {response.status_code} {response.reason}")
        if response.status_code in (401, 403):
            raise UserError(f"data.url {redact_url(url)}: server answered {response.status_code} {response.reason}; "
                            f"give its credentials in ~/.netrc or ${AUTH_VARIABLE}, not in data.url, or check them")
        if response.status_code >= 400:
            raise UserError(f"data.url {redact_url(url)}: server answered {response.status_code} {response.reason}; "
                            "check the URL")
        start = resume_offset(response)
        if start not in (0, have):
            part.unlink()
            raise Retryable(f"server resumed at byte {start} instead of {have}; starting over")
        total = expected_size(response)
        with open(part, "r+b" if start else "wb") as fh, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, desc="download", disable=None
        ) as bar:
            fh.seek(start)
            fh.truncate()
            # read1 hands over whatever has arrived, so an interrupted transfer keeps every byte it got.
            while chunk := response.raw.read1(CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise Retryable(f"got {part.stat().st_size} of {total} bytes")


def auth_from_environment() -> Callable[[requests.PreparedRequest], requests.PreparedRequest] | None:
    """$PIPELINE_DATA_AUTH as the Authorization header, winning over ~/.netrc. requests drops it on
    a redirect to another host (a signed storage URL must not get a token meant for the server)."""
    header = os.environ.get(AUTH_VARIABLE)
    if not header:
        return None

    def authorize(request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = header
        return request

    return authorize


def resume_offset(response: requests.Response) -> int:
    """Where the body starts in the file: the Content-Range start of a 206, else 0 (whole file)."""
    if response.status_code != 206:
        return 0
    return int(response.headers["Content-Range"].split()[1].split("-")[0])


def expected_size(response: requests.Response) -> int | None:
    if response.status_code == 206:
        total = response.headers["Content-Range"].rsplit("/", 1)[1]
        return None if total == "*" else int(total)
    length = response.headers.get("Content-Length")
    return int(length) if length else None


# --- Safe extraction --------------------------------------------------------------------------


@dataclass
class Member:
    """One archive entry, the same for tar and zip."""

    name: str
    kind: str  # file | dir | link | special | unreadable
    link: str | None = None  # for links: the target's path from the archive root, as written
    stream: IO[bytes] | None = None  # for files
    detail: str = ""  # for specials, unreadables and unsafe links: what it is


def extract(archive: Path, dest: Path, limits: DataParams) -> None:
    """Unpack ``archive`` into ``dest``: regular files and folders only, within the size caps."""
    written: set[PurePosixPath] = set()
    links: list[tuple[PurePosixPath, PurePosixPath, str]] = []
    size = 0
    fmt = archive_format(archive, str(archive))
    if fmt == "tar":
        warn_about_tarfile()
    try:
        with open(archive, "rb") as fh, tqdm.wrapattr(
            fh, "read", total=archive.stat().st_size, desc="extract", disable=None
        ) as raw, open_members(raw, fmt, archive) as members:
            for member in members:
                path = member_path(archive, member.name)
                if member.kind == "special":
                    refuse(archive, member.name, f"{member.detail}; only files and folders are extracted")
                if member.kind == "unreadable":
                    raise UserError(f"{archive}: cannot extract member {readable(member.name)!r}: {member.detail}; "
                                    "unpack the archive yourself and set data.url to the folder")
                if member.kind == "dir":
                    (dest / path).mkdir(parents=True, exist_ok=True)
                    continue
                check_count(archive, len(written) + len(links) + 1, limits)
                if member.kind == "link":
                    links.append((path, link_target(archive, member), member.name))
                    continue
                size = write_capped(member.stream, dest / path, size, archive, limits)
                written.add(path)
            # Links become copies, made last because a symlink may point to a later member.
            for path, target, name in links:
                if target not in written:
                    refuse(archive, name, f"link to '{target}', which is not a file in the archive")
                size += (dest / target).stat().st_size
                check_size(archive, size, limits)
                (dest / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(dest / target, dest / path)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{archive} is damaged or truncated ({err}); delete it and download again") from None
    except OSError as err:
        if err.errno in OUT_OF_SPACE:
            raise
        raise UserError(f"could not extract {archive}: {err}") from None


def warn_about_tarfile() -> None:
    major, minor, micro = sys.version_info[:3]
    fixed = TARFILE_FIXED.get((major, minor))
    if fixed is not None and micro < fixed:
        print(f"warning: Python {major}.{minor}.{micro} predates the tarfile fixes for malicious archives "
              f"(CVE-2025-4517, CVE-2025-8194 and others) in Python {major}.{minor}.{fixed}; this stage checks every "
              "member itself, but upgrade Python to read tar archives you do not trust", file=sys.stderr)


@contextmanager
def open_members(raw: IO[bytes], fmt: str, archive: Path) -> Iterator[Iterator[Member]]:
    if fmt == "zip":
        with zipfile.ZipFile(raw) as zf:
            yield zip_members(zf, archive)
    else:
        with tarfile.open(fileobj=raw, mode="r|*") as tar:  # one streaming pass, any compression
            yield tar_members(tar)


def tar_members(tar: tarfile.TarFile) -> Iterator[Member]:
    for info in tar:
        if info.isreg():
            yield Member(info.name, "file", stream=tar.extractfile(info))
        elif info.isdir():
            yield Member(info.name, "dir")
        elif info.issym():
            yield Member(info.name, "link", link=posixpath.join(posixpath.dirname(info.name), info.linkname),
                         detail=f"symlink to '{info.linkname}'")
        elif info.islnk():  # hard links name their target from the archive root
            yield Member(info.name, "link", link=info.linkname, detail=f"hard link to '{info.linkname}'")
        else:
            yield Member(info.name, "special", detail="a device file" if info.ischr() or info.isblk() else "a FIFO")


def zip_members(zf: zipfile.ZipFile, archive: Path) -> Iterator[Member]:
    warned = False
    for info in zf.infolist():
        name, cp437 = zip_name(info)
        if cp437 and not warned:
            warned = True
            print(f"warning: {archive}: zip member names that are not UTF-8 are read as cp437, the zip format's "
                  f"default, e.g. {name!r}; if names look wrong, repack the archive with a tool that writes UTF-8 "
                  "names (7-Zip, Info-ZIP zip)", file=sys.stderr)
        mode = info.external_attr >> 16  # Unix mode bits, 0 when the zip tool stored none
        if name.endswith("/"):
            yield Member(name, "dir")
        elif info.flag_bits & ZIP_ENCRYPTED:  # zipfile would stop with a RuntimeError asking for a password
            yield Member(name, "unreadable", detail="it is encrypted (a password-protected zip)")
        elif info.compress_type not in ZIP_METHODS:  # e.g. Deflate64, which Windows uses for big archives
            method = zipfile.compressor_names.get(info.compress_type, "unknown")
            yield Member(name, "unreadable",
                         detail=f"it is compressed with method {info.compress_type} ({method}), which Python cannot read")
        elif stat.S_ISLNK(mode):  # a zip symlink stores its target as the member's content
            with zf.open(info) as fh:
                target = fh.read(4096).decode("utf-8", "backslashreplace").replace("\\", "/")
            yield Member(name, "link", link=posixpath.join(posixpath.dirname(name), target),
                         detail=f"symlink to '{target}'")
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: only permissions stored
            yield Member(name, "special", detail="a device file or FIFO")
        else:
            yield Member(name, "file", stream=zf.open(info))


def zip_name(info: zipfile.ZipInfo) -> tuple[str, bool]:
    """The member's path, with ``\\`` (written by some Windows tools) as a separator, and whether it
    stays cp437.

    Without the UTF-8 flag zipfile decodes a name as cp437, but macOS Archive Utility, 7-Zip and
    Info-ZIP write UTF-8 without setting it: bytes that are valid UTF-8 are taken as UTF-8, the
    rest (Windows' own zipper writes its code page) stay cp437. zipfile's ``metadata_encoding``
    cannot do this: it applies to every member of the archive and fails on any name it cannot decode.
    """
    name, cp437 = info.filename, False
    if not info.flag_bits & ZIP_UTF8:
        try:
            name = name.encode("cp437").decode("utf-8")
        except UnicodeDecodeError:
            cp437 = True
    return name.replace("\\", "/"), cp437


def refuse(archive: Path, name: str, why: str) -> NoReturn:
    raise UserError(f"{archive}: refusing member {readable(name)!r}: {why} "
                    "(unsafe archive: get it from a trusted source)")


def member_path(archive: Path, name: str) -> PurePosixPath:
    path = PurePosixPath(readable(name))
    if path.is_absolute():
        refuse(archive, name, "absolute path")
    if path.parts and DRIVE.match(path.parts[0]):
        refuse(archive, name, "a Windows drive letter")
    if ".." in path.parts:
        refuse(archive, name, "'..' in path")
    return path


def link_target(archive: Path, member: Member) -> PurePosixPath:
    """The archive path a link points to; links that leave the archive are refused."""
    target = readable(member.link)
    resolved = posixpath.normpath(target)
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        refuse(archive, member.name, f"{member.detail} points outside the archive")
    return PurePosixPath(resolved)


def write_capped(stream: IO[bytes], path: Path, size: int, archive: Path, limits: DataParams) -> int:
    """Copy ``stream`` to ``path``, counting bytes as they come (declared sizes can lie); the new total."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with stream, open(path, "wb") as out:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            check_size(archive, size, limits)
            out.write(chunk)
    return size


def check_count(archive: Path, count: int, limits: DataParams) -> None:
    if count > limits.max_files:
        raise UserError(f"{archive} holds more than data.max_files={limits.max_files} files (an archive bomb?): "
                        "raise data.max_files if the archive is genuine")


def check_size(archive: Path, size: int, limits: DataParams) -> None:
    if size > limits.max_bytes:
        raise UserError(f"{archive} unpacks to more than data.max_bytes={limits.max_bytes} bytes (an archive bomb?): "
                        "raise data.max_bytes if the archive is genuine")


# --- Local folders ----------------------------------------------------------------------------


def copy_folder(folder: Path, dest: Path, root: Path, skipped: list[dict], visiting: frozenset = frozenset()) -> None:
    """Copy ``folder`` into ``dest`` with links replaced by what they point to.

    Links are followed only while they stay inside ``root`` (the source folder). Links leading
    outside it, broken links, links back into a folder being copied (loops) and special files are
    skipped and listed in ``skipped``.
    """
    for entry in sorted(folder.iterdir()):
        real, target = entry.resolve(), dest / readable(entry.name)
        why = skip_reason(entry, real, root, visiting)
        if why:
            skipped.append({"path": readable(str(entry.relative_to(root))), "reason": why})
        elif real.is_dir():
            target.mkdir()
            copy_folder(entry, target, root, skipped, visiting | {real})
        else:
            shutil.copyfile(real, target)


def skip_reason(entry: Path, real: Path, root: Path, visiting: frozenset) -> str | None:
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
        raise UserError(f"data.url: {redact_url(cfg.url)} holds several top folders ({folder_list(dirs)}), and "
                        f"{folder_list(wrapped)} {verb} only folders, like a whole dataset: several datasets side "
                        "by side? set data.url to the folder of the one to use (unpack an archive first) or repack "
                        "it with its class folders at the top; if the folders inside are the classes, set "
                        "data.class_depth: 2")
    if wrapped:
        print(f"warning: data.url: every top folder of {redact_url(cfg.url)} ({folder_list(dirs)}) holds only "
              "folders: the labels are these top folders (data.class_depth: 1); if the folders inside them are "
              "the classes, set data.class_depth: 2, or if they are several datasets, set data.url to one",
              file=sys.stderr)


def folder_list(folders: list[Path]) -> str:
    more = f" and {len(folders) - SHOWN} more" if len(folders) > SHOWN else ""
    return ", ".join(f"{readable(p.name)}/" for p in folders[:SHOWN]) + more


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
        raise UserError(f"data.labels: {table} {found}; its first row must name the columns path,label or "
                        "path,label,split (paths relative to the source, e.g. daisy/1.jpg)")
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


# --- The stage --------------------------------------------------------------------------------


def main() -> None:
    cfg = load_config().data
    source = local_source(cfg.url)
    if source is not None and not source.exists():
        raise UserError(f"data.url: {source} does not exist")
    table = Path(cfg.labels).expanduser() if cfg.labels else None
    labels = read_labels(table) if table else None
    skipped: list[dict] = []
    with atomic_dir(RAW_DIR) as staging:
        if source is not None and source.is_dir():
            if cfg.sha256:
                raise UserError("data.sha256 applies to archives, but data.url is a folder: set data.sha256 to null")
            # A local folder is copied, so DVC versions exactly what was trained on.
            root = source.resolve()
            top = dataset_root(root)
            check_one_dataset(top, cfg)
            try:
                copy_folder(top, staging, root, skipped)
            except OSError as err:
                if err.errno in OUT_OF_SPACE:
                    raise
                raise UserError(f"data.url: could not copy {source}: {err}") from None
            sha256 = None
        else:
            archive, sha256 = (source, verify(source, cfg.sha256, cfg.url)) if source else fetch(cfg.url, cfg.sha256)
            root = staging / ".unpacked"
            extract(archive, root, cfg)
            top = dataset_root(root)
            check_one_dataset(top, cfg)
            for entry in top.iterdir():
                entry.rename(staging / entry.name)
            shutil.rmtree(root)
        files = [p for p in staging.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        if labels:
            write_labels(labels, staging, top.relative_to(root))
    table_record = {"path": cfg.labels, "sha256": sha256_of(table), "rows": len(labels) - 1} if labels else None
    write_json(DOWNLOAD_REPORT, {"url": redact_url(cfg.url), "sha256": sha256, "files": len(files), "bytes": size, "skipped": skipped,
                        "labels": table_record})
    for item in skipped:
        print(f"download: skipped {item['path']}: {item['reason']}", file=sys.stderr)
    pinned = f"sha256 {sha256}" if sha256 else "local folder, no archive hash"
    listed = f"; labels table {cfg.labels} ({len(labels) - 1} rows) in {LABELS_TABLE}" if labels else ""
    print(f"download: {len(files)} files ({size / 2**20:.1f} MiB) in {RAW_DIR}; {pinned}; {len(skipped)} skipped{listed}")


if __name__ == "__main__":
    run_stage(main)
