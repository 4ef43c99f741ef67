"""Stage 1, download: fetch the image archive (or take a local folder) and extract it safely.

Output: ``data/raw/`` with one sub-folder per class, and ``reports/download.json`` recording the
source and the archive's sha256 (so ``dvc.lock`` pins exactly what was used).

Downloads go to a per-user cache (``$PIPELINE_CACHE_DIR``, default ``~/.cache/transfer-pipeline``)
through a ``.part`` file that is renamed only once complete and verified, so a re-run with the
archive already there touches no network, and an interrupted one resumes where it stopped.
"""

import hashlib
import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from pipeline.cli import UserError, run_stage
from pipeline.config import load_config
from pipeline.data import RAW_DIR
from pipeline.files import atomic_dir, write_json

REPORT = Path("reports/download.json")
MAX_FILES = 1_000_000
MAX_BYTES = 64 * 2**30  # refuse archives that would unpack to more than this (zip/tar bombs)
RETRIES = 4
CHUNK = 2**20


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "transfer-pipeline"
    return Path(os.environ.get("PIPELINE_CACHE_DIR", default)) / "downloads"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


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


def fetch(url: str) -> Path:
    """Download ``url`` into the cache (resuming a partial file) and return the complete file."""
    name = PurePosixPath(urlparse(url).path).name or "download"
    target = cache_dir() / hashlib.sha1(url.encode()).hexdigest()[:12] / name
    if target.is_file():
        print(f"using cached download {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    for attempt in range(1, RETRIES + 1):
        try:
            _fetch_into(url, part)
            part.rename(target)
            return target
        except requests.RequestException as err:
            if attempt == RETRIES:
                raise UserError(
                    f"could not download data.url {url} ({type(err).__name__}) after {RETRIES} tries; "
                    "offline? set data.url to a local archive or folder"
                ) from None
            wait = 2**attempt
            print(f"download failed ({type(err).__name__}); retrying in {wait}s ({attempt}/{RETRIES})")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _fetch_into(url: str, part: Path) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=(10, 60)) as response:
        response.raise_for_status()
        if response.status_code != 206:  # server ignored the range: start over
            have = 0
        total = int(response.headers.get("Content-Length", 0)) + have
        with open(part, "ab" if have else "wb") as fh, tqdm(
            total=total or None, initial=have, unit="B", unit_scale=True, desc="download"
        ) as bar:
            for chunk in response.iter_content(CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
    if total and part.stat().st_size != total:
        raise requests.ConnectionError(f"got {part.stat().st_size} of {total} bytes")


def verify(path: Path, expected: str | None) -> str:
    actual = sha256_of(path)
    if expected and actual != expected:
        raise UserError(f"sha256 mismatch for {path}: expected data.sha256={expected}, got {actual}")
    return actual


def describe_non_archive(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "an HTML page (an error page saved under the archive's name?)"
    if not head:
        return "empty"
    return f"not a tar or zip archive (starts with {head[:16]!r})"


def extract(archive: Path, dest: Path) -> None:
    if tarfile.is_tarfile(archive):
        _extract_tar(archive, dest)
    elif zipfile.is_zipfile(archive):
        _extract_zip(archive, dest)
    else:
        raise UserError(f"data.url: {archive} is {describe_non_archive(archive)}")


def _check_caps(count: int, size: int, archive: Path) -> None:
    if count > MAX_FILES or size > MAX_BYTES:
        raise UserError(
            f"{archive} would unpack to {count} files / {size / 2**30:.1f} GiB, over the limit of "
            f"{MAX_FILES} files / {MAX_BYTES / 2**30:.0f} GiB (an archive bomb?)"
        )


def _extract_tar(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            _check_caps(len(members), sum(m.size for m in members), archive)
            for member in tqdm(members, desc="extract", unit="file"):
                # The "data" filter refuses absolute paths, "..", links leaving dest and device files.
                tar.extract(member, dest, filter="data")
    except tarfile.FilterError as err:
        raise UserError(f"{archive}: refusing unsafe member '{err.tarinfo.name}' ({type(err).__name__})") from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{archive} is damaged or truncated ({err}); delete it and download again") from None


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _check_caps(len(infos), sum(i.file_size for i in infos), archive)
        for info in tqdm(infos, desc="extract", unit="file"):
            name = PurePosixPath(info.filename)
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if name.is_absolute() or ".." in name.parts or is_link:
                raise UserError(f"{archive}: refusing unsafe member '{info.filename}'")
            try:
                zf.extract(info, dest)
            except (zipfile.BadZipFile, OSError) as err:
                raise UserError(f"{archive} is damaged or truncated ({err})") from None


def dataset_root(folder: Path) -> Path:
    """Descend through a single wrapping folder (``flower_photos/``) to the class folders."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    dirs = [p for p in entries if p.is_dir()]
    if len(dirs) == 1 and all(p.is_dir() or p.suffix.lower() in (".txt", ".md") for p in entries):
        return dataset_root(dirs[0])
    return folder


def main() -> None:
    cfg = load_config()
    source = local_source(cfg.data.url)
    if source is not None and not source.exists():
        raise UserError(f"data.url: {source} does not exist")
    with atomic_dir(RAW_DIR) as staging:
        if source is not None and source.is_dir():
            # A local folder is copied, so DVC versions exactly what was trained on.
            shutil.copytree(dataset_root(source), staging, dirs_exist_ok=True)
            sha256 = None
        else:
            archive = source if source is not None else fetch(cfg.data.url)
            sha256 = verify(archive, cfg.data.sha256)
            unpacked = staging / ".unpacked"
            extract(archive, unpacked)
            for entry in dataset_root(unpacked).iterdir():
                entry.rename(staging / entry.name)
            shutil.rmtree(unpacked)
        files = sum(1 for p in staging.rglob("*") if p.is_file())
    write_json(REPORT, {"url": cfg.data.url, "sha256": sha256, "files": files})
    print(f"download: {files} files in {RAW_DIR} (sha256 {sha256 or 'n/a: local folder'})")


if __name__ == "__main__":
    run_stage(main)
