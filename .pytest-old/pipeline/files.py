"""Writing outputs so that a failed or interrupted stage never leaves half-written files.

Everything is written next to its destination under a temporary name and renamed into place
only when complete (rename is atomic on one file system). A temporary's name carries the host
and pid of the process writing it, ``.<name>.tmp-<host>-<pid>-<random>``: the next write into
the same folder deletes those whose process is gone (killed with SIGKILL, a power cut). New
files and folders get the permissions the umask allows, as ``open`` and ``mkdir`` give them.
"""

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HOST = socket.gethostname()
# .<name>.tmp-<host>-<pid>-<random>: being written; .<name>.old-...: the previous folder during
# the two renames that swap a new one in.
TEMPORARY = re.compile(rf"\.(?P<name>.+)\.(?P<kind>tmp|old)-{re.escape(HOST)}-(?P<pid>\d+)-[0-9a-f]+")
_swept: set[Path] = set()  # folders this process has already cleaned


def temporary(final: Path, kind: str = "tmp") -> Path:
    return final.with_name(f".{final.name}.{kind}-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(folder: Path) -> None:
    """Delete the temporaries dead processes left in ``folder``, once per process and folder.

    A swap cut between its two renames is undone: the previous folder comes back when nothing
    took its place. Only this host's temporaries are judged, as pids mean nothing elsewhere.
    """
    if folder in _swept:
        return
    _swept.add(folder)
    for entry in folder.iterdir():
        match = TEMPORARY.fullmatch(entry.name)
        if not match or alive(int(match["pid"])):
            continue
        final = folder / match["name"]
        if match["kind"] == "old" and not final.exists():
            entry.rename(final)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final.parent)
    tmp = temporary(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = temporary(final, "old")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file that replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final.parent)
    tmp = temporary(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cache_root() -> Path:
    """Per-user cache shared by all projects: downloads and rendered augmentations."""
    return Path(os.environ.get("PIPELINE_CACHE_DIR", Path.home() / ".cache" / "transfer-pipeline"))


def readable(name: str) -> str:
    """``name`` as valid UTF-8: bytes that were not UTF-8 (surrogate escapes) become ``\\xNN`` text."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
