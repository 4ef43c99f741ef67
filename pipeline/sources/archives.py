"""Safe extraction of tar and zip archives: no absolute paths, ``..``, drive letters, outside links,
device files, or more files and bytes than ``data.max_files`` / ``data.max_bytes``."""

import posixpath
import re
import shutil
import stat
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, NoReturn, cast

from tqdm import tqdm

from pipeline.cli import OUT_OF_SPACE, UserError
from pipeline.config import DataParams
from pipeline.files import readable
from pipeline.sources.fetch import archive_format

CHUNK = 2**20
ZIP_ENCRYPTED = 0x1  # general purpose flag bit 0: ZipCrypto or AES
ZIP_UTF8 = 0x800  # general purpose flag bit 11: the name is UTF-8 (else cp437, says the zip standard)
DRIVE = re.compile(r"[A-Za-z]:")  # C:/x.jpg, C:x.jpg: a Windows path, absolute or on another drive
# The first release of each Python line with tarfile's 2025 fixes for malicious archives: the
# extraction filter's (CVE-2025-4517, -4330, -4138, -4435, CVE-2024-12718: 3.9.23, 3.10.18, 3.11.13,
# 3.12.11, 3.13.4), which extract() does not use, and the header parser's (CVE-2025-8194, an endless
# loop on a negative offset), which it does. Lines from 3.14 on have them all.
TARFILE_FIXED = {(3, 9): 24, (3, 10): 19, (3, 11): 14, (3, 12): 12, (3, 13): 6}
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)  # what zipfile reads


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
        with (
            open(archive, "rb") as fh,
            tqdm.wrapattr(fh, "read", total=archive.stat().st_size, desc="extract", disable=None) as raw,
            open_members(raw, fmt, archive) as members,
        ):
            for member in members:
                path = member_path(archive, member.name)
                if member.kind == "special":
                    refuse(archive, member.name, f"{member.detail}; only files and folders are extracted")
                if member.kind == "unreadable":
                    raise UserError(
                        f"{archive}: cannot extract member {readable(member.name)!r}: {member.detail}; "
                        "unpack the archive yourself and set data.url to the folder"
                    )
                if member.kind == "dir":
                    (dest / path).mkdir(parents=True, exist_ok=True)
                    continue
                check_count(archive, len(written) + len(links) + 1, limits)
                if member.kind == "link":
                    links.append((path, link_target(archive, member), member.name))
                    continue
                size = write_capped(cast(IO[bytes], member.stream), dest / path, size, archive, limits)
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
        print(
            f"warning: Python {major}.{minor}.{micro} predates the tarfile fixes for malicious archives "
            f"(CVE-2025-4517, CVE-2025-8194 and others) in Python {major}.{minor}.{fixed}; this stage checks every "
            "member itself, but upgrade Python to read tar archives you do not trust",
            file=sys.stderr,
        )


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
            yield Member(
                info.name,
                "link",
                link=posixpath.join(posixpath.dirname(info.name), info.linkname),
                detail=f"symlink to '{info.linkname}'",
            )
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
            print(
                f"warning: {archive}: zip member names that are not UTF-8 are read as cp437, the zip format's "
                f"default, e.g. {name!r}; if names look wrong, repack the archive with a tool that writes UTF-8 "
                "names (7-Zip, Info-ZIP zip)",
                file=sys.stderr,
            )
        mode = info.external_attr >> 16  # Unix mode bits, 0 when the zip tool stored none
        if name.endswith("/"):
            yield Member(name, "dir")
        elif info.flag_bits & ZIP_ENCRYPTED:  # zipfile would stop with a RuntimeError asking for a password
            yield Member(name, "unreadable", detail="it is encrypted (a password-protected zip)")
        elif info.compress_type not in ZIP_METHODS:  # e.g. Deflate64, which Windows uses for big archives
            method = zipfile.compressor_names.get(info.compress_type, "unknown")  # type: ignore[attr-defined]  # undocumented
            yield Member(
                name,
                "unreadable",
                detail=f"it is compressed with method {info.compress_type} ({method}), which Python cannot read",
            )
        elif stat.S_ISLNK(mode):  # a zip symlink stores its target as the member's content
            with zf.open(info) as fh:
                target = fh.read(4096).decode("utf-8", "backslashreplace").replace("\\", "/")
            yield Member(
                name, "link", link=posixpath.join(posixpath.dirname(name), target), detail=f"symlink to '{target}'"
            )
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
    raise UserError(
        f"{archive}: refusing member {readable(name)!r}: {why} (unsafe archive: get it from a trusted source)"
    )


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
    target = readable(cast(str, member.link))  # links always have one
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
        raise UserError(
            f"{archive} holds more than data.max_files={limits.max_files} files (an archive bomb?): "
            "raise data.max_files if the archive is genuine"
        )


def check_size(archive: Path, size: int, limits: DataParams) -> None:
    if size > limits.max_bytes:
        raise UserError(
            f"{archive} unpacks to more than data.max_bytes={limits.max_bytes} bytes (an archive bomb?): "
            "raise data.max_bytes if the archive is genuine"
        )
