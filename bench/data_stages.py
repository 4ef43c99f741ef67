"""Data stages: download, prepare and augment throughput (images/s) and peak memory on an archive slice.

Runs each stage as ``python -m pipeline.<stage>`` in a scratch project outside the repository, on
all cores, with an empty augment render cache. Peak memory is polled RSS of the stage's whole
process tree (ProcessPoolExecutor workers included): the peak of the sum, and the largest single
process. Prints the figures and the command to reproduce.

    python bench/data_stages.py --archive flower_photos.tgz --per-class 40 --image-size 299
"""

import argparse
import shutil
import tempfile
from pathlib import Path

# common puts the repository on sys.path, so pipeline is importable from here on.
from common import add_slice_arguments, load_average, manifest_rows, new_workdir, run_stage
from pipeline.data.images import IMAGE_SUFFIXES


def run(workdir: Path) -> list[tuple[str, str]]:
    """Download, prepare and augment from scratch in ``workdir``; the figures as (name, value) rows."""
    for folder in ("data", "cache", "reports"):
        shutil.rmtree(workdir / folder, ignore_errors=True)
    runs = {name: run_stage(name, workdir) for name in ("download", "prepare", "augment")}
    raw = sum(1 for p in (workdir / "data/raw").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    prepared = len(manifest_rows(workdir / "data/prepared/manifest.csv"))
    written = len(manifest_rows(workdir / "data/augmented/manifest.csv"))
    rows = [
        ("images unpacked / kept by prepare / written by augment", f"{raw} / {prepared} / {written}"),
        ("download (unpack archive)", f"{runs['download'].seconds:.1f} s"),
        (
            "prepare",
            (
                f"{runs['prepare'].seconds:.1f} s = {raw / runs['prepare'].seconds:.1f} images "
                "normalized/s (it normalizes every unpacked image, then caps per class)"
            ),
        ),
        (
            "augment (empty render cache)",
            f"{runs['augment'].seconds:.1f} s = {written / runs['augment'].seconds:.1f} images written/s",
        ),
    ]
    for name, stage in runs.items():
        rows.append(
            (
                f"{name} peak RSS: process tree sum / largest process",
                f"{stage.peak_rss_mb:.0f} MiB / {stage.peak_single_rss_mb:.0f} MiB",
            )
        )
    rows.append(("load average (1 min) after", load_average()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_arguments(parser)
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args()
    workdir = new_workdir(
        args.workdir or Path(tempfile.mkdtemp(prefix="bench-")),
        args.archive,
        args.per_class,
        args.image_size,
        args.copies,
        epochs=10,
    )
    for name, value in run(workdir):
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
