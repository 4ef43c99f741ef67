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
wrong ``data.sha256`` never deletes one that matched before. One process at a time downloads a URL
(``downloads/<url key>.lock``: a parallel experiment waits, then uses the archive the first one
downloaded). The one ``data.sha256`` names (or, when null, the latest) is used without any network
access. Network errors are retried with backoff and resume the ``.part`` with an HTTP Range
request; after the last try, or ``data.max_seconds`` after the start, the ``.part`` is kept so that
the next run resumes it. A ``.part`` that is not an archive (an error page) is deleted, and so is
one that grows past ``data.max_bytes`` (an endless response: the download stops there).
Credentials come from ``~/.netrc`` (or ``$NETRC``) or ``$PIPELINE_DATA_AUTH`` (an Authorization
header), never from params.yaml, as DVC writes params to ``dvc.lock``; any in ``data.url`` are
masked in what this stage writes and prints.

Extraction refuses absolute paths, ``..``, Windows drive letters, links pointing outside the
archive, device files and archives over ``data.max_files`` / ``data.max_bytes``, naming the bad
member. It writes into a temporary folder that replaces ``data/raw`` only on success. Reading a tar
archive on a Python older than the tarfile fixes of 2025 (TARFILE_FIXED) prints one warning.
"""

import shutil
import sys
from pathlib import Path

from pipeline.cli import OUT_OF_SPACE, UserError, redact_url, run_stage
from pipeline.config import load_config
from pipeline.files import atomic_dir, sha256_of, write_json
from pipeline.paths import DOWNLOAD_REPORT, LABELS_TABLE, RAW_DIR
from pipeline.sources.archives import extract
from pipeline.sources.fetch import fetch, local_source, verify
from pipeline.sources.folders import check_one_dataset, copy_folder, dataset_root
from pipeline.sources.labels_table import read_labels, write_labels

# The first release of each Python line with tarfile's 2025 fixes for malicious archives: the
# extraction filter's (CVE-2025-4517, -4330, -4138, -4435, CVE-2024-12718: 3.9.23, 3.10.18, 3.11.13,
# 3.12.11, 3.13.4), which extract() does not use, and the header parser's (CVE-2025-8194, an endless
# loop on a negative offset), which it does. Lines from 3.14 on have them all.
TARFILE_FIXED = {(3, 9): 24, (3, 10): 19, (3, 11): 14, (3, 12): 12, (3, 13): 6}


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
            archive, sha256 = (source, verify(source, cfg.sha256, cfg.url)) if source else fetch(cfg)
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
    table_record = (
        {"path": cfg.labels, "sha256": sha256_of(table), "rows": len(labels) - 1} if table and labels else None
    )
    write_json(
        DOWNLOAD_REPORT,
        {
            "url": redact_url(cfg.url),
            "sha256": sha256,
            "files": len(files),
            "bytes": size,
            "skipped": skipped,
            "labels": table_record,
        },
    )
    for item in skipped:
        print(f"download: skipped {item['path']}: {item['reason']}", file=sys.stderr)
    pinned = f"sha256 {sha256}" if sha256 else "local folder, no archive hash"
    listed = f"; labels table {cfg.labels} ({len(labels) - 1} rows) in {LABELS_TABLE}" if labels else ""
    print(
        f"download: {len(files)} files ({size / 2**20:.1f} MiB) in {RAW_DIR}; {pinned}; {len(skipped)} skipped{listed}"
    )


if __name__ == "__main__":
    run_stage(main)
