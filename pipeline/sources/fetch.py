"""Fetching a source: local paths or http(s) URLs, a per-user download cache, retries that resume,
checksums, and telling an archive from a folder by its content (pipeline.stages.download's docstring)."""

import glob
import hashlib
import os
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import requests
import urllib3
from tqdm import tqdm

from pipeline.cli import UserError, redact_url
from pipeline.config import DataParams
from pipeline.files import cache_root, exclusive, sha256_of

RETRIES = 4
RETRY_WAIT_S = 1.0  # doubles after each failed try
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 60  # per connection attempt and per read
CHUNK = 2**20
AUTH_VARIABLE = "PIPELINE_DATA_AUTH"  # the Authorization header for data.url, e.g. "Bearer <token>"


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


@dataclass(frozen=True)
class Limits:
    """What one download may take: ``max_bytes`` (data.max_bytes) and until ``deadline``
    (time.monotonic(), data.max_seconds from the start, all tries together)."""

    max_bytes: int
    max_seconds: float
    deadline: float

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


def fetch(cfg: DataParams) -> tuple[Path, str]:
    """The archive at ``data.url`` in the cache, downloading it only if needed, and its sha256.

    One process at a time per URL: another one (a parallel experiment) waits for it, then finds
    the archive cached, instead of writing into the same ``.part``.
    """
    folder = cache_dir() / hashlib.sha256(cfg.url.encode()).hexdigest()[:16]
    with exclusive(
        folder.with_name(f"{folder.name}.lock"),
        f"download: waiting for another process downloading {redact_url(cfg.url)} into {folder}",
    ):
        return fetch_locked(cfg, folder)


def fetch_locked(cfg: DataParams, folder: Path) -> tuple[Path, str]:
    url, expected = cfg.url, cfg.sha256
    name = PurePosixPath(unquote(urlparse(url).path)).name or "download"
    shown = redact_url(url)
    cached = cached_archive(folder, name, expected)
    if cached:
        print(f"download: using cached {cached} (no network access)")
        return cached, cached.parent.name
    if expected and (others := sorted(p.parent.name for p in folder.glob(f"*/{glob.escape(name)}"))):
        print(
            f"download: no cached archive from {shown} has data.sha256={expected} (cached: {', '.join(others)}); "
            "downloading again",
            file=sys.stderr,
        )
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{name}.part"
    download_with_retries(url, part, Limits(cfg.max_bytes, cfg.max_seconds, time.monotonic() + cfg.max_seconds))
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


def download_with_retries(url: str, part: Path, limits: Limits) -> None:
    for attempt in range(1, RETRIES + 1):
        try:
            download_into(url, part, limits)
            return
        except (requests.RequestException, urllib3.exceptions.HTTPError, Retryable) as err:
            problem = str(err) if isinstance(err, Retryable) else type(err).__name__
            kept = f"; the partial file {part} is kept and resumes next run" if part.exists() else ""
            if limits.seconds_left() <= 0:
                raise UserError(
                    f"could not download data.url {redact_url(url)} within data.max_seconds="
                    f"{limits.max_seconds:g} ({problem}){kept}; a slow server? raise data.max_seconds, "
                    "or set data.url to a copy on a faster one"
                ) from None
            if attempt == RETRIES:
                raise UserError(
                    f"could not download data.url {redact_url(url)} ({problem}) after {RETRIES} tries{kept}; "
                    "offline? set data.url to a local archive or folder, e.g. data.url=/path/to/flower_photos.tgz"
                ) from None
            wait = min(RETRY_WAIT_S * 2 ** (attempt - 1), limits.seconds_left())
            print(f"download: {problem}; retrying in {wait:g}s ({attempt}/{RETRIES})", file=sys.stderr)
            time.sleep(wait)


def download_into(url: str, part: Path, limits: Limits) -> None:
    """Fetch ``url`` into ``part``, continuing after the bytes already there when the server allows.
    Stops at ``limits``: past its deadline (Retryable, which then gives up), or with a body larger
    than its bytes (UserError, the partial file deleted: it is no archive worth resuming)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    # Each read waits at most READ_TIMEOUT_S, and never past the deadline.
    timeout = (CONNECT_TIMEOUT_S, max(min(READ_TIMEOUT_S, limits.seconds_left()), 0.001))
    # Without an auth, requests uses ~/.netrc ($NETRC), and again after a redirect to another host.
    with requests.get(url, headers=headers, auth=auth_from_environment(), stream=True, timeout=timeout) as response:
        if response.status_code == 416 and response.headers.get("Content-Range") == f"bytes */{have}":
            return  # the .part already holds the whole file (an earlier run stopped before renaming it)
        if response.status_code == 416:  # the .part is longer than what the server has now
            part.unlink()
            raise Retryable("server refused to resume; starting over")
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise Retryable(f"server answered {response.status_code} {response.reason}")
        if response.status_code in (401, 403):
            raise UserError(
                f"data.url {redact_url(url)}: server answered {response.status_code} {response.reason}; "
                f"give its credentials in ~/.netrc or ${AUTH_VARIABLE}, not in data.url, or check them"
            )
        if response.status_code >= 400:
            raise UserError(
                f"data.url {redact_url(url)}: server answered {response.status_code} {response.reason}; check the URL"
            )
        start = resume_offset(response)
        if start not in (0, have):
            part.unlink()
            raise Retryable(f"server resumed at byte {start} instead of {have}; starting over")
        total = expected_size(response)
        if total is not None and total > limits.max_bytes:
            part.unlink(missing_ok=True)
            raise too_large(url, f"announces {total} bytes, more", limits)
        with (
            open(part, "r+b" if start else "wb") as fh,
            tqdm(total=total, initial=start, unit="B", unit_scale=True, desc="download", disable=None) as bar,
        ):
            fh.seek(start)
            fh.truncate()
            # read1 hands over whatever has arrived, so an interrupted transfer keeps every byte it got.
            while chunk := response.raw.read1(CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
                if fh.tell() > limits.max_bytes:
                    fh.close()
                    part.unlink()
                    raise too_large(url, "sent more bytes", limits)
                if limits.seconds_left() <= 0:
                    raise Retryable(f"got {fh.tell()} of {total or 'an unknown number of'} bytes")
    if total is not None and part.stat().st_size != total:
        raise Retryable(f"got {part.stat().st_size} of {total} bytes")


def too_large(url: str, what: str, limits: Limits) -> UserError:
    return UserError(
        f"data.url {redact_url(url)}: the server {what} than data.max_bytes={limits.max_bytes} (an "
        "endless or wrong response?); nothing was kept: raise data.max_bytes if the archive is that large"
    )


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
