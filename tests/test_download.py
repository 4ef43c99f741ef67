"""download: every kind of source, checksums, safe extraction, resumable downloads, offline re-runs.

The stage runs in-process in a throw-away folder (params.yaml + its own download cache), against
generated archives and a real HTTP server on 127.0.0.1. Retries wait 10 ms instead of seconds.
"""

import base64
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, set_params
from fixtures_bad import HTML_PAGE, jpeg_bytes, tar_entry, tar_with, write_pictures, zip_claiming, zip_with
from pipeline.cli import UserError
from pipeline.sources import fetch
from pipeline.stages import download


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch) -> None:
    monkeypatch.setattr(fetch, "RETRY_WAIT_S", 0.01)


def download_from(url, **params) -> dict:
    set_params(Path.cwd(), **{"data.url": str(url), **params})
    download.main()
    return json.loads(Path("reports/download.json").read_text())


def refused(url, **params) -> str:
    """The one-line error for ``url``; checks that data/raw is as it was and no staging folder is left."""
    existed, before = Path("data/raw").exists(), contents(Path("data/raw"))
    with pytest.raises(UserError) as err:
        download_from(url, **params)
    assert "\n" not in str(err.value)
    assert Path("data/raw").exists() == existed and contents(Path("data/raw")) == before
    assert not list(Path("data").glob(".raw.tmp-*"))
    return str(err.value)


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def flowers(tmp_path: Path) -> Path:
    """A source folder shaped like flower_photos: a wrapping folder, a LICENSE, two classes."""
    root = tmp_path / "src" / "flowers"
    write_pictures(root, {"daisy": 2, "tulips": 2})
    (root / "LICENSE.txt").write_text("CC-BY\n")
    return root


def cached_files(workdir: Path) -> list[Path]:
    """The download cache's files but its lock files (one per URL, kept: fetch.fetch)."""
    return sorted(p for p in (workdir.parent / "cache").rglob("*") if p.is_file() and p.suffix != ".lock")


# --- Sources ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gztar", "tar", "zip"])
def test_local_archive_unpacks_to_class_folders(workdir, flowers, fmt):
    archive = Path(shutil.make_archive(str(workdir.parent / "flowers"), fmt, flowers.parent))
    report = download_from(archive)
    assert sorted(p.name for p in Path("data/raw").iterdir()) == ["LICENSE.txt", "daisy", "tulips"]
    assert (Path("data/raw/daisy") / "img_0000.jpg").read_bytes() == (flowers / "daisy" / "img_0000.jpg").read_bytes()
    assert report["sha256"] == sha256(archive) and report["files"] == 5


def test_file_url_and_matching_sha256(workdir, flowers):
    archive = Path(shutil.make_archive(str(workdir.parent / "flowers"), "gztar", flowers.parent))
    report = download_from(archive.as_uri(), **{"data.sha256": sha256(archive)})
    assert report["sha256"] == sha256(archive)
    assert len(list(Path("data/raw/tulips").iterdir())) == 2


def test_checksum_mismatch_names_both_hashes(workdir, flowers):
    archive = Path(shutil.make_archive(str(workdir.parent / "flowers"), "gztar", flowers.parent))
    message = refused(archive, **{"data.sha256": "0" * 64})
    assert "0" * 64 in message and sha256(archive) in message


def test_local_folder_is_copied_following_only_links_inside(workdir, flowers):
    outside = workdir.parent / "outside.jpg"
    outside.write_bytes(jpeg_bytes(99))
    (flowers / "daisy" / "linked.jpg").symlink_to(flowers / "tulips" / "img_0002.jpg")
    (flowers / "roses").symlink_to(flowers / "tulips", target_is_directory=True)
    (flowers / "daisy" / "escape.jpg").symlink_to(outside)
    (flowers / "daisy" / "broken.jpg").symlink_to(flowers / "missing.jpg")
    (flowers / "daisy" / "loop").symlink_to(flowers, target_is_directory=True)
    report = download_from(flowers)
    raw = Path("data/raw")
    assert not [p for p in raw.rglob("*") if p.is_symlink()]
    assert (raw / "daisy" / "linked.jpg").read_bytes() == (flowers / "tulips" / "img_0002.jpg").read_bytes()
    assert sorted(p.name for p in (raw / "roses").iterdir()) == ["img_0002.jpg", "img_0003.jpg"]
    assert sorted(p.name for p in (raw / "daisy").iterdir()) == ["img_0000.jpg", "img_0001.jpg", "linked.jpg"]
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons["daisy/escape.jpg"].endswith("outside the source folder")
    assert reasons["daisy/broken.jpg"] == "broken link"
    assert reasons["daisy/loop"].startswith("link loop")
    assert report["sha256"] is None and report["files"] == 8


def test_file_link_loops_in_a_folder_are_skipped_and_listed(workdir, flowers):
    (flowers / "daisy" / "self.jpg").symlink_to("self.jpg")
    (flowers / "daisy" / "ping.jpg").symlink_to("pong.jpg")
    (flowers / "daisy" / "pong.jpg").symlink_to("ping.jpg")
    report = download_from(flowers)
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert {path: reasons[path] for path in ("daisy/self.jpg", "daisy/ping.jpg", "daisy/pong.jpg")} == dict.fromkeys(
        ("daisy/self.jpg", "daisy/ping.jpg", "daisy/pong.jpg"), "link loop (links that lead back to themselves)"
    )
    assert sorted(p.name for p in Path("data/raw/daisy").iterdir()) == ["img_0000.jpg", "img_0001.jpg"]


def test_folder_with_sha256_set_is_a_user_error(workdir, flowers):
    assert "set data.sha256 to null" in refused(flowers, **{"data.sha256": "a" * 64})


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_non_utf8_unicode_and_spaced_names_arrive_readable(workdir, tmp_path, kind):
    odd = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not valid UTF-8
    if kind == "folder":
        source = tmp_path / "odd"
        for folder in ("rosé rouge", "tulips"):
            (source / folder).mkdir(parents=True)
        (source / "rosé rouge" / odd).write_bytes(jpeg_bytes(1))
        (source / "tulips" / "花.jpg").write_bytes(jpeg_bytes(2))
    else:
        source = tmp_path / "odd.tar"
        with tarfile.open(source, "w", encoding="utf-8", errors="surrogateescape") as tar:
            for name, seed in ((f"rosé rouge/{odd}", 1), ("tulips/花.jpg", 2)):
                info = tarfile.TarInfo(name)
                data = jpeg_bytes(seed)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    download_from(source)
    names = sorted(str(p.relative_to("data/raw")) for p in Path("data/raw").rglob("*.jpg"))
    assert names == ["rosé rouge/caf\\xe9.jpg", "tulips/花.jpg"]


# --- Labels table -----------------------------------------------------------------------------


def test_labels_table_is_copied_with_paths_as_found_in_data_raw(workdir, flowers):
    archive = Path(shutil.make_archive(str(workdir.parent / "flowers"), "gztar", flowers.parent))  # flowers/...
    table = workdir.parent / "labels.csv"
    table.write_text(
        "\ufeffpath, Label\nflowers/daisy/img_0000.jpg,daisy\ntulips/img_0002.jpg,tulips\nflowers/nowhere.jpg,daisy\n",
        encoding="utf-8",
    )  # with a BOM, as spreadsheets write it
    report = download_from(archive, **{"data.labels": str(table)})
    copied = Path("data/raw/.labels.csv").read_text(encoding="utf-8").splitlines()
    assert copied == [
        "path,label",
        "daisy/img_0000.jpg,daisy",
        "tulips/img_0002.jpg,tulips",
        "flowers/nowhere.jpg,daisy",
    ]
    assert report["labels"] == {"path": str(table), "sha256": sha256(table), "rows": 3}
    assert report["files"] == 5  # the source's files; the table is not one of them


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("file,class\n", "starts with 'file,class'"),
        ("path,label,label\n", "starts with 'path,label,label'"),
        ("path,label,fold\n", "starts with 'path,label,fold'"),
        ("", "is empty"),
    ],
    ids=["names", "twice", "unknown", "empty"],
)
def test_labels_table_with_a_header_that_does_not_fit_is_refused(workdir, flowers, content, problem):
    table = workdir.parent / "labels.csv"
    table.write_text(content + "daisy/img_0000.jpg,daisy\n" if content else "", encoding="utf-8")
    assert refused(flowers, **{"data.labels": str(table)}) == (
        f"data.labels: {table} {problem}; its first row must name the columns path,label or path,label,split "
        "(paths relative to the source, e.g. daisy/1.jpg)"
    )


def test_missing_labels_table_is_refused_before_downloading(workdir, server):
    missing = workdir.parent / "nowhere.csv"
    assert refused(server.url, **{"data.labels": str(missing)}) == f"data.labels: {missing} does not exist"
    assert server.ranges == []


# --- Safe extraction --------------------------------------------------------------------------

DATA = jpeg_bytes(0)


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([(tar_entry("flowers/../../evil.jpg"), DATA)], "'flowers/../../evil.jpg': '..' in path"),
        ([(tar_entry("/tmp/evil.jpg"), DATA)], "'/tmp/evil.jpg': absolute path"),
        (
            [(tar_entry("flowers/a/x.jpg", tarfile.SYMTYPE, "../../../outside.jpg"), b"")],
            "'flowers/a/x.jpg': symlink to '../../../outside.jpg' points outside the archive",
        ),
        (
            [(tar_entry("flowers/a/x.jpg", tarfile.SYMTYPE, "/etc/passwd"), b"")],
            "'flowers/a/x.jpg': symlink to '/etc/passwd' points outside the archive",
        ),
        (
            [(tar_entry("flowers/a/x.jpg", tarfile.LNKTYPE, "../outside.jpg"), b"")],
            "'flowers/a/x.jpg': hard link to '../outside.jpg' points outside the archive",
        ),
        (
            [(tar_entry("flowers/a/x.jpg", tarfile.LNKTYPE, "flowers/a/missing.jpg"), b"")],
            "link to 'flowers/a/missing.jpg', which is not a file in the archive",
        ),
        ([(tar_entry("flowers/a/tty", tarfile.CHRTYPE), b"")], "'flowers/a/tty': a device file"),
        ([(tar_entry("flowers/a/fifo", tarfile.FIFOTYPE), b"")], "'flowers/a/fifo': a FIFO"),
    ],
    ids=["dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-out", "link-missing", "device", "fifo"],
)
def test_unsafe_tar_members_are_refused(workdir, members, expected):
    archive = tar_with(workdir.parent / "evil.tgz", [(tar_entry("flowers/a/ok.jpg"), DATA), *members])
    message = refused(archive)
    assert expected in message and "refusing member" in message
    assert not list(workdir.parent.parent.rglob("evil.jpg"))


@pytest.mark.parametrize(
    ("members", "symlinks", "expected"),
    [
        ([("../evil.jpg", DATA)], {}, "'../evil.jpg': '..' in path"),
        ([("/abs/evil.jpg", DATA)], {}, "'/abs/evil.jpg': absolute path"),
        ([], {"a/x.jpg": "../../outside.jpg"}, "'a/x.jpg': symlink to '../../outside.jpg' points outside"),
    ],
    ids=["dotdot", "absolute", "symlink-out"],
)
def test_unsafe_zip_members_are_refused(workdir, members, symlinks, expected):
    archive = zip_with(workdir.parent / "evil.zip", [("a/ok.jpg", DATA), *members], symlinks)
    assert expected in refused(archive)


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"flag_bits": 0x1}, "it is encrypted (a password-protected zip)"),
        ({"method": 9}, "it is compressed with method 9 (deflate64), which Python cannot read"),
    ],
    ids=["encrypted", "deflate64"],
)
def test_zip_members_zipfile_cannot_read_are_one_line(workdir, claims, problem):
    archive = zip_claiming(workdir.parent / "locked.zip", **claims)
    assert refused(archive) == (
        f"{archive}: cannot extract member 'b/x.jpg': {problem}; "
        "unpack the archive yourself and set data.url to the folder"
    )


def test_links_inside_the_archive_become_copies(workdir):
    archive = tar_with(
        workdir.parent / "links.tgz",
        [
            (tar_entry("flowers/a/y.jpg", tarfile.SYMTYPE, "x.jpg"), b""),  # before its target: resolved at the end
            (tar_entry("flowers/a/x.jpg"), DATA),
            (tar_entry("flowers/b/z.jpg", tarfile.LNKTYPE, "flowers/a/x.jpg"), b""),
            (tar_entry("flowers/b/w.jpg", tarfile.SYMTYPE, "../a/x.jpg"), b""),
        ],
    )
    download_from(archive)
    files = sorted(Path("data/raw").rglob("*.jpg"))
    assert [str(p.relative_to("data/raw")) for p in files] == ["a/x.jpg", "a/y.jpg", "b/w.jpg", "b/z.jpg"]
    assert all(not p.is_symlink() and p.read_bytes() == DATA for p in files)


def test_zip_symlink_inside_becomes_a_copy(workdir):
    download_from(zip_with(workdir.parent / "links.zip", [("a/x.jpg", DATA), ("b/y.jpg", DATA)], {"a/s.jpg": "x.jpg"}))
    assert Path("data/raw/a/s.jpg").read_bytes() == DATA and not Path("data/raw/a/s.jpg").is_symlink()


@pytest.mark.parametrize("fmt", ["tgz", "zip"])
def test_archive_bombs_hit_the_caps(workdir, fmt):
    zeros = bytes(3_000_000)  # compresses to a few KB
    if fmt == "tgz":
        archive = tar_with(workdir.parent / "bomb.tgz", [(tar_entry("a/big.jpg"), zeros), (tar_entry("b/x.jpg"), DATA)])
    else:
        archive = zip_with(workdir.parent / "bomb.zip", [("a/big.jpg", zeros), ("b/x.jpg", DATA)])
    assert archive.stat().st_size < 100_000
    message = refused(archive, **{"data.max_bytes": 1_000_000})
    assert "unpacks to more than data.max_bytes=1000000 bytes (an archive bomb?)" in message
    many = [(tar_entry(f"a/{i}.jpg"), DATA) for i in range(5)]
    message = refused(tar_with(workdir.parent / "many.tgz", many), **{"data.max_files": 3, "data.max_bytes": 10**9})
    assert "more than data.max_files=3 files" in message


def test_html_page_instead_of_archive_says_so(workdir):
    page = workdir.parent / "flower_photos.tgz"
    page.write_bytes(HTML_PAGE)
    assert "is not a tar or zip archive: it is an HTML page" in refused(page)
    page.write_bytes(b"")
    assert "it is an empty file" in refused(page)


@pytest.mark.parametrize("fmt", ["gztar", "zip"])
def test_truncated_archive_is_reported(workdir, flowers, fmt):
    archive = Path(shutil.make_archive(str(workdir.parent / "flowers"), fmt, flowers.parent))
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 6 // 10])
    expected = "is damaged or truncated" if fmt == "gztar" else "it is a damaged or truncated zip archive"
    assert expected in refused(archive)


def test_stage_prints_one_line_for_a_bad_archive(workdir):
    (workdir / "page.tgz").write_bytes(HTML_PAGE)
    set_params(workdir, **{"data.url": "page.tgz"})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.download"], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: data.url: page.tgz is not a tar or zip archive: it is an HTML page "
        "(an error or login page saved under the archive's name?)"
    ]


# --- Archives from other tools: name encodings, Windows separators, several top folders ------------


def zip_with_raw_names(path: Path, members: list[tuple[bytes, bytes]]) -> Path:
    """A zip whose member names are the given bytes with flag bit 11 (UTF-8) unset, as macOS Archive
    Utility, 7-Zip and Info-ZIP write UTF-8 names and Windows' own zipper its code page: each is
    written under an ASCII stand-in of the same length, then swapped in both headers."""
    stand_ins = [bytes([ord("A") + i]) * len(name) for i, (name, _) in enumerate(members)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for stand_in, (_, data) in zip(stand_ins, members):
            zf.writestr(stand_in.decode(), data)
    content = path.read_bytes()
    for stand_in, (name, _) in zip(stand_ins, members):
        assert content.count(stand_in) == 2  # the local and the central header
        content = content.replace(stand_in, name)
    path.write_bytes(content)
    assert not any(info.flag_bits & 0x800 for info in zipfile.ZipFile(path).infolist())
    return path


def raw_names() -> list[str]:
    return sorted(str(p.relative_to("data/raw")) for p in Path("data/raw").rglob("*") if p.is_file())


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_unflagged_utf8_zip_names_are_read_as_utf8(workdir, capsys):
    archive = zip_with_raw_names(
        workdir.parent / "mac.zip", [("photos/rosé/花.jpg".encode(), DATA), (b"photos/tulips/x.jpg", DATA)]
    )
    download_from(archive)
    assert raw_names() == ["rosé/花.jpg", "tulips/x.jpg"]  # not 'ros├⌐/Φè▒.jpg'
    assert warnings(capsys.readouterr().err) == []


def test_zip_names_in_a_windows_code_page_stay_cp437_with_one_warning(workdir, capsys):
    archive = zip_with_raw_names(
        workdir.parent / "windows.zip",
        [
            ("café/1.jpg".encode("cp437"), DATA),  # Windows' zipper on an OEM code page: read right
            ("café/2.jpg".encode("cp437"), DATA),
            ("tulips/crème.jpg".encode("cp1252"), DATA),
        ],
    )  # on an ANSI code page: cp437 misreads it
    download_from(archive)
    assert raw_names() == ["café/1.jpg", "café/2.jpg", "tulips/crΦme.jpg"]
    assert warnings(capsys.readouterr().err) == [
        f"warning: {archive}: zip member names that are not UTF-8 are read as cp437, the zip format's default, "
        "e.g. 'café/1.jpg'; if names look wrong, repack the archive with a tool that writes UTF-8 names "
        "(7-Zip, Info-ZIP zip)"
    ]


def test_backslash_separated_zip_names_are_folders(workdir):
    archive = zip_with(
        workdir.parent / "backslash.zip",
        [
            ("flowers\\daisy\\", b""),
            ("flowers\\daisy\\a.jpg", DATA),
            ("flowers\\tulips\\b.jpg", DATA),
            ("flowers\\LICENSE.txt", b"CC-BY\n"),
        ],
    )
    report = download_from(archive)
    assert raw_names() == ["LICENSE.txt", "daisy/a.jpg", "tulips/b.jpg"]  # the wrapping folder is skipped
    assert report["files"] == 3


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a\\..\\..\\evil.jpg", "'a/../../evil.jpg': '..' in path"),
        ("\\tmp\\evil.jpg", "'/tmp/evil.jpg': absolute path"),
        ("\\\\server\\share\\evil.jpg", "'//server/share/evil.jpg': absolute path"),
        ("C:\\evil.jpg", "'C:/evil.jpg': a Windows drive letter"),
        ("c:evil.jpg", "'c:evil.jpg': a Windows drive letter"),
    ],
    ids=["dotdot", "root", "unc", "drive", "drive-relative"],
)
def test_backslash_names_are_checked_after_normalizing(workdir, name, expected):
    archive = zip_with(workdir.parent / "evil.zip", [("a/ok.jpg", DATA), (name, DATA)])
    assert expected in refused(archive)
    assert not list(workdir.parent.parent.rglob("evil.jpg"))


def flowers_members(top: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [(tar_entry(f"{top}/{name}"), DATA) for name in ("daisy/a.jpg", "tulips/b.jpg")] + [
        (tar_entry(f"{top}/LICENSE.txt"), b"CC-BY\n")
    ]


def test_a_wrapped_dataset_beside_class_folders_is_refused_and_all_wrapped_ones_are_warned_of(workdir, capsys):
    archive = tar_with(
        workdir.parent / "two.tgz",
        [*flowers_members("flowers"), (tar_entry("extras/x.jpg"), DATA), (tar_entry("more/y.jpg"), DATA)],
    )
    assert refused(archive) == (
        f"data.url: {archive} holds several top folders (extras/, flowers/, more/), and flowers/ holds only "
        "folders, like a whole dataset: several datasets side by side? set data.url to the folder of the one "
        "to use (unpack an archive first) or repack it with its class folders at the top; if the folders "
        "inside are the classes, set data.class_depth: 2"
    )
    source = workdir.parent / "unpacked"
    for info, data in flowers_members("flowers") + flowers_members("others"):
        (source / info.name).parent.mkdir(parents=True, exist_ok=True)
        (source / info.name).write_bytes(data)
    capsys.readouterr()
    download_from(source)
    assert (
        f"warning: data.url: every top folder of {source} (flowers/, others/) holds only folders: the labels "
        "are these top folders"
    ) in capsys.readouterr().err
    assert sorted(p.name for p in Path("data/raw").iterdir()) == ["flowers", "others"]


@pytest.mark.parametrize(
    ("members", "params", "expected"),
    [
        (
            [("cats/a.jpg", DATA), ("dogs/b.jpg", DATA), ("LICENSE.txt", b"")],
            {},
            ["LICENSE.txt", "cats/a.jpg", "dogs/b.jpg"],
        ),
        ([("train/cats/a.jpg", DATA), ("val/cats/b.jpg", DATA)], {}, ["train/cats/a.jpg", "val/cats/b.jpg"]),
        (
            [("dogs/husky/a.jpg", DATA), ("cats/siamese/b.jpg", DATA)],
            {"data.class_depth": 2},
            ["cats/siamese/b.jpg", "dogs/husky/a.jpg"],
        ),
        (
            [
                ("data/flowers/daisy/a.jpg", DATA),
                ("data/flowers/tulips/b.jpg", DATA),
                ("__MACOSX/data/._x.jpg", b""),
                ("data/.DS_Store", b""),
                ("data/flowers/._c.jpg", b""),
            ],
            {},
            ["._c.jpg", "daisy/a.jpg", "tulips/b.jpg"],
        ),
    ],
    ids=["class-folders", "split-folders", "class-depth-2", "wrapped-twice-with-macos-junk"],
)
def test_layouts_with_several_top_folders_are_kept(workdir, members, params, expected):
    download_from(zip_with(workdir.parent / "ok.zip", members), **params)
    assert raw_names() == expected


def test_old_python_warns_once_about_tarfile(workdir, capsys, monkeypatch):
    archive = tar_with(
        workdir.parent / "many.tgz",
        [(tar_entry(f"a/{i}.jpg"), DATA) for i in range(3)] + [(tar_entry(f"b/{i}.jpg"), DATA) for i in range(3)],
    )
    monkeypatch.setattr(sys, "version_info", (3, 11, 7, "final", 0))
    download_from(archive)
    assert warnings(capsys.readouterr().err) == [
        "warning: Python 3.11.7 predates the tarfile fixes for malicious archives (CVE-2025-4517, CVE-2025-8194 and "
        "others) in Python 3.11.14; this stage checks every member itself, but upgrade Python to read tar archives "
        "you do not trust"
    ]
    for fixed in ((3, 11, 14), (3, 12, 12), (3, 13, 6), (3, 14, 0)):
        monkeypatch.setattr(sys, "version_info", (*fixed, "final", 0))
        download_from(archive)
        assert warnings(capsys.readouterr().err) == [], fixed
    monkeypatch.setattr(sys, "version_info", (3, 12, 11, "final", 0))  # the filter fixes, not the parser's
    download_from(zip_with(workdir.parent / "a.zip", [("a/x.jpg", DATA), ("b/y.jpg", DATA)]))
    assert warnings(capsys.readouterr().err) == []  # tarfile never reads a zip
    download_from(archive)
    assert "in Python 3.12.12;" in capsys.readouterr().err


# --- Downloading over HTTP --------------------------------------------------------------------


class ArchiveServer(ThreadingHTTPServer):
    """Serves ``payload`` with Range support; ``cuts`` makes the next responses stop after N bytes."""

    def __init__(self, payload: bytes):
        super().__init__(("127.0.0.1", 0), ArchiveHandler)
        self.payload, self.page, self.status = payload, None, 200
        self.cuts: list[int] = []
        self.ranges: list[str | None] = []
        self.trickle = 0.0  # seconds between KiB of the body: a slow server
        self.endless = 0  # > 0: this many zero bytes instead, without a Content-Length (a body without end)
        self.authorization: str | None = None  # the Authorization header the server requires, if any
        self.url = f"http://127.0.0.1:{self.server_port}/data/flower_photos.tgz"


class ArchiveHandler(BaseHTTPRequestHandler):
    server: ArchiveServer

    def do_GET(self):
        requested = self.headers.get("Range")
        self.server.ranges.append(requested)
        if self.server.authorization and self.headers.get("Authorization") != self.server.authorization:
            return self.send_error(401)
        if self.server.status != 200:
            return self.send_error(self.server.status)
        if self.server.endless:
            self.send_response(200)
            self.end_headers()
            for _ in range(self.server.endless // 2**16):
                self.wfile.write(bytes(2**16))
            return
        start = int(requested.removeprefix("bytes=").rstrip("-")) if requested else 0
        if start >= len(self.server.payload):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(self.server.payload)}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        body = self.server.page or self.server.payload[start:]
        self.send_response(206 if start else 200)
        if start:
            size = len(self.server.payload)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.cuts.pop(0) if self.server.cuts else len(body)
        step = 1024 if self.server.trickle else max(cut, 1)
        for start in range(0, cut, step):
            self.wfile.write(
                body[start : min(start + step, cut)]
            )  # then the connection closes: an interrupted transfer
            time.sleep(self.server.trickle)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(flowers, tmp_path):
    archive = Path(shutil.make_archive(str(tmp_path / "served"), "gztar", flowers.parent))
    httpd = ArchiveServer(archive.read_bytes())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_interrupted_download_resumes_with_range(workdir, server):
    third = len(server.payload) // 3
    server.cuts = [third]
    report = download_from(server.url)
    assert server.ranges == [None, f"bytes={third}-"]
    [cached] = cached_files(workdir)
    assert cached.name == "flower_photos.tgz" and cached.read_bytes() == server.payload
    assert report["sha256"] == hashlib.sha256(server.payload).hexdigest()
    assert len(list(Path("data/raw/daisy").iterdir())) == 2


def test_failed_download_keeps_the_part_and_the_next_run_resumes(workdir, server):
    server.cuts = [1000] * fetch.RETRIES
    message = refused(server.url)
    assert f"after {fetch.RETRIES} tries" in message and "is kept and resumes next run" in message
    [part] = cached_files(workdir)
    assert part.name == "flower_photos.tgz.part" and part.stat().st_size == 1000 * fetch.RETRIES
    download_from(server.url)
    assert server.ranges[-1] == f"bytes={1000 * fetch.RETRIES}-"
    assert [p.read_bytes() for p in cached_files(workdir)] == [server.payload]


def test_a_complete_part_left_by_a_killed_run_is_used(workdir, server):
    server.cuts = [1000] * fetch.RETRIES
    refused(server.url)
    [part] = cached_files(workdir)
    part.write_bytes(server.payload)  # as if the previous run died between the last byte and the rename
    download_from(server.url)
    assert server.ranges[-1] == f"bytes={len(server.payload)}-"
    assert [p.name for p in cached_files(workdir)] == ["flower_photos.tgz"]


def test_wrong_checksum_download_is_kept_under_its_own_hash(workdir, server):
    actual = hashlib.sha256(server.payload).hexdigest()
    message = refused(server.url, **{"data.sha256": "f" * 64})
    assert "f" * 64 in message and actual in message
    assert [p.relative_to(p.parents[1]) for p in cached_files(workdir)] == [Path(actual, "flower_photos.tgz")]
    stop(server)
    download_from(server.url, **{"data.sha256": actual})  # trusting the new hash needs no network


def test_a_mistyped_sha256_never_deletes_the_verified_archive(workdir, server, capsys):
    actual = hashlib.sha256(server.payload).hexdigest()
    first = download_from(server.url)
    typo = actual[:-1] + ("0" if actual[-1] != "0" else "1")
    assert f"got {actual}" in refused(server.url, **{"data.sha256": typo})
    assert [p.read_bytes() for p in cached_files(workdir)] == [server.payload]
    assert f"no cached archive from {server.url} has data.sha256={typo} (cached: {actual}); downloading again" in (
        capsys.readouterr().err
    )
    stop(server)  # offline: the verified archive must still be there
    assert "(ConnectionError)" in refused(server.url, **{"data.sha256": "e" * 64})
    assert download_from(server.url, **{"data.sha256": actual}) == {**first, "url": server.url}


def test_html_error_page_from_the_server_is_not_cached(workdir, server):
    server.page = HTML_PAGE
    assert f"data.url: {server.url} is not a tar or zip archive: it is an HTML page" in refused(server.url)
    assert cached_files(workdir) == []
    server.page = None
    download_from(server.url)
    assert server.ranges == [None, None]


def test_client_errors_are_not_retried(workdir, server):
    server.status = 404
    assert f"data.url {server.url}: server answered 404 Not Found; check the URL" in refused(server.url)
    assert server.ranges == [None] and cached_files(workdir) == []


def test_server_errors_are_retried(workdir, server):
    server.status = 503
    assert "(server answered 503 Service Unavailable) after 4 tries" in refused(server.url)
    assert len(server.ranges) == fetch.RETRIES


def test_a_body_past_max_bytes_is_cut_off_and_not_kept(workdir, server):
    server.endless = 50 * 2**20  # the client stops reading long before
    message = refused(server.url, **{"data.max_bytes": 1_000_000})
    assert message == (
        f"data.url {server.url}: the server sent more bytes than data.max_bytes=1000000 (an endless or "
        "wrong response?); nothing was kept: raise data.max_bytes if the archive is that large"
    )
    assert cached_files(workdir) == []


def test_an_announced_size_past_max_bytes_is_refused_before_the_body(workdir, server):
    message = refused(server.url, **{"data.max_bytes": len(server.payload) - 1})
    assert f"the server announces {len(server.payload)} bytes, more than data.max_bytes=" in message
    assert cached_files(workdir) == [] and server.ranges == [None]


def test_a_trickling_server_is_given_up_at_max_seconds_and_resumed_next_run(workdir, server):
    server.trickle = 0.5  # 2 KiB/s
    started = time.monotonic()
    message = refused(server.url, **{"data.max_seconds": 1.5})
    assert time.monotonic() - started < 5
    assert message.startswith(f"could not download data.url {server.url} within data.max_seconds=1.5 (got ")
    assert message.endswith("; a slow server? raise data.max_seconds, or set data.url to a copy on a faster one")
    [part] = cached_files(workdir)
    kept = part.stat().st_size
    assert part.name == "flower_photos.tgz.part" and 0 < kept < len(server.payload)
    assert "is kept and resumes next run" in message
    server.trickle = 0
    download_from(server.url)
    assert server.ranges[-1] == f"bytes={kept}-"


def stop(server: ArchiveServer) -> None:
    server.shutdown()
    server.server_close()  # nothing listens any more: any network access would fail


def test_cached_archive_is_used_without_network(workdir, server):
    first = download_from(server.url)
    stop(server)
    shutil.rmtree("data/raw")
    again = download_from(server.url)
    assert again == first and len(list(Path("data/raw/tulips").iterdir())) == 2


def test_offline_with_nothing_cached_is_one_line(workdir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    message = refused(f"http://127.0.0.1:{port}/flower_photos.tgz")
    assert f"could not download data.url http://127.0.0.1:{port}/flower_photos.tgz (ConnectionError)" in message
    assert "offline? set data.url to a local archive or folder" in message


# --- Credentials ------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def with_credentials(url: str, userinfo: str, query: str) -> str:
    return url.replace("http://", f"http://{userinfo}@") + query


def test_credentials_in_the_url_are_masked_in_the_report_and_the_errors(workdir, server):
    server.authorization = basic("alice", "hunter2")
    url = with_credentials(server.url, "alice:hunter2", "?sig=abc123,x&v=1")
    report = download_from(url)
    assert report["url"] == with_credentials(server.url, "alice:***", "?sig=***&v=***")
    server.status = 404
    message = refused(with_credentials(server.url, "alice:hunter2", "?sig=abc123"))
    assert message.startswith(f"data.url {with_credentials(server.url, 'alice:***', '?sig=***')}: server answered 404")
    offline = refused(with_credentials(server.url.replace(str(server.server_port), "1"), "ghp_token", ""))
    assert "could not download data.url http://***@127.0.0.1:1/" in offline
    written = Path("reports/download.json").read_text() + message + offline
    assert not any(secret in written for secret in ("hunter2", "abc123", "ghp_token"))


def test_credentials_from_netrc(workdir, server, monkeypatch):
    server.authorization = basic("alice", "hunter2")
    assert refused(server.url) == (
        f"data.url {server.url}: server answered 401 Unauthorized; give its credentials "
        "in ~/.netrc or $PIPELINE_DATA_AUTH, not in data.url, or check them"
    )
    netrc = workdir.parent / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password hunter2\n")
    monkeypatch.setenv("NETRC", str(netrc))  # requests reads $NETRC, else ~/.netrc
    assert download_from(server.url)["sha256"] == hashlib.sha256(server.payload).hexdigest()


def test_credentials_from_the_environment_win_over_netrc(workdir, server, monkeypatch):
    server.authorization = "Bearer tok-123"
    netrc = workdir.parent / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password wrong\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv(fetch.AUTH_VARIABLE, "Bearer tok-123")
    assert download_from(server.url)["url"] == server.url
