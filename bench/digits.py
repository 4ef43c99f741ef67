"""Prepare on low-detail images: generated 28x28 grey digits (tests/conftest.py make_digits) in
given train/ and test/ folders, as MNIST comes. For each size: download and prepare wall time,
seconds per 1,000 images, near-duplicate groups, images not searched, and how far each class's
drawn val split is from prepare.split (the chaining of issue 24: val 53,160 of 60,000 before).

    python bench/digits.py --images 10000 70000 [--workdir DIR] [--append bench/results.md]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

# common puts the repository on sys.path, so pipeline is importable from here on.
from common import REPO, add_project_arguments, machine, report, run_stage
from pipeline.config import override_params

sys.path.insert(0, str(REPO / "tests"))
from conftest import make_digits  # noqa: E402

TEST_SHARE = 1 / 7  # MNIST: 60,000 train, 10,000 test


def prepared(workdir: Path, images: int) -> list[tuple[str, ...]]:
    """Generate ``images`` digits in ``workdir``, download and prepare them; the figures as a row."""
    source = workdir / f"digits-{images}"
    started = time.perf_counter()
    per_class = images // 10
    make_digits(source / "train", per_class - round(per_class * TEST_SHARE))
    make_digits(source / "test", round(per_class * TEST_SHARE), seed=1)
    generated = time.perf_counter() - started
    project = workdir / f"project-{images}"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", project)
    override_params(project / "params.yaml", {"data.url": str(source), "prepare.min_side": 28})
    download, prepare = run_stage("download", project), run_stage("prepare", project)
    data = json.loads((project / "reports/data.json").read_text())
    off = max(abs(counts["val"] / (counts["train"] + counts["val"]) - 0.15) for counts in data["per_class"].values())
    split = ", ".join(f"{name} {n}" for name, n in data["per_split"].items())
    return [
        (
            f"{images:,}",
            f"{generated:.0f}",
            f"{download.seconds:.1f}",
            f"{prepare.seconds:.1f}",
            f"{1000 * prepare.seconds / images:.2f}",
            f"{prepare.peak_rss_mb:.0f}",
            split,
            f"{100 * off:.2f}",
            f"{data['near_duplicate_groups']} / {data['largest_near_duplicate_group']}",
            f"{data['near_duplicates_not_searched']:,}",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 70_000], help="dataset sizes")
    add_project_arguments(parser)
    args = parser.parse_args()
    started, info = time.perf_counter(), machine()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-digits-"))).resolve()
    rows = [row for images in args.images for row in prepared(workdir, images)]
    header = (
        "images",
        "generated (s)",
        "download (s)",
        "prepare (s)",
        "prepare s / 1,000 images",
        "prepare peak RSS (MiB)",
        "splits",
        "worst class: val off 15 % by (points)",
        "near-duplicate groups / largest",
        "not searched (crowded or flat hash)",
    )
    report(
        "Prepare on low-detail images (generated 28x28 digits, given train/ and test/)",
        rows,
        f"python bench/digits.py --images {' '.join(map(str, args.images))}",
        started,
        info,
        args.append,
        header=header,
    )


if __name__ == "__main__":
    main()
