"""Memory and disk per run on the whole archive: each stage's peak RSS, and how much the DVC cache
and the MLflow store grow per experiment.

A scratch git + DVC project (``sweep.new_project``) on every image of the archive, a MobileNetV2
with real ImageNet weights (``--weights``) at 224 px, the project's training defaults otherwise:
``dvc repro`` with its process tree polled (``sweep.timed_dvc``): each stage's wall time and peak
RSS (the sum over the stage's processes, ProcessPoolExecutor workers included, and the largest
one). Then ``--experiments`` warm-loop experiments one after another (``dvc exp run -S
train.learning_rate=...`` in the workspace), with ``du -sb`` of ``.dvc/cache``, ``mlartifacts/``
and ``mlflow.db`` before and after each. A 12-point sweep's growth per experiment (queued,
on a slice): ``bench/sweep.py``.

    python bench/footprint.py --archive flower_photos.tgz --weights mobilenet_v2_1.0_224_imagenet_no_top.h5
"""

import argparse
import tempfile
import time
from pathlib import Path

import sweep

from common import REPO, add_project_arguments, load_average, machine, report
from pipeline.config import load_config

LEARNING_RATES = (0.0005, 0.002, 0.0003, 0.003)  # one per experiment; none is params.yaml's
OUTPUTS = ("data/raw", "data/prepared", "data/augmented", "data/features", "data/model", "data/export")


def memory_rows(run: sweep.DvcRun, prefix: str = "") -> list[tuple[str, str]]:
    return [
        (
            f"{prefix}{name}: wall, peak RSS (process tree sum / largest process)",
            f"{stage.seconds:.1f} s, {stage.peak_rss_mb:.0f} / {stage.peak_single_rss_mb:.0f} MiB",
        )
        for name, stage in run.stages.items()
    ]


def experiment_rows(project: Path, number: int, learning_rate: float) -> list[tuple[str, str]]:
    before = sweep.disk(project)
    args = sweep.set_args({"train.learning_rate": learning_rate})
    run = sweep.timed_dvc(project, "exp", "run", *args)
    if sweep.stages_run(run.output) != sweep.RERUN:
        raise SystemExit(f"experiment {number} ran {sweep.stages_run(run.output)}, not {sweep.RERUN}")
    grown = sweep.growth(before, sweep.disk(project))
    return [
        (
            f"experiment {number}: dvc exp run {' '.join(args)}, wall",
            f"{run.seconds:.1f} s ({sweep.stage_breakdown(run)})",
        ),
        *memory_rows(run, "  "),
        ("  growth (DVC cache, MLflow artifacts, MLflow database)", sweep.mib(grown)),
    ]


def run(project: Path, experiments: int) -> list[tuple[str, str]]:
    first = sweep.timed_dvc(project, "repro")
    sweep.commit(project, "baseline")
    rows = [
        ("first run: dvc repro, wall", f"{first.seconds:.1f} s ({sweep.stage_breakdown(first)})"),
        *memory_rows(first),
        ("stores after it (DVC cache, MLflow artifacts, MLflow database)", sweep.mib(sweep.disk(project))),
        (
            "outputs in the workspace (MiB)",
            ", ".join(f"{name} {sweep.size(project / name) / 2**20:.1f}" for name in OUTPUTS),
        ),
    ]
    for number, learning_rate in enumerate(LEARNING_RATES[:experiments], start=1):
        rows += experiment_rows(project, number, learning_rate)
    return [*rows, ("load average (1 min) after", load_average())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="the flowers archive (.tgz)")
    parser.add_argument("--weights", type=Path, required=True, help="ImageNet weights (no top) for --backbone")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--per-class", type=int, help="data.max_per_class (default: every image)")
    parser.add_argument(
        "--experiments",
        type=int,
        choices=range(len(LEARNING_RATES) + 1),
        default=2,
        help="warm-loop experiments after the first run",
    )
    add_project_arguments(parser)
    args = parser.parse_args()
    defaults = load_config(REPO / "params.yaml")
    overrides = {
        "model.backbone": args.backbone,
        "model.weights": str(args.weights.resolve()),
        "train.early_stopping_patience": defaults.train.early_stopping_patience,
    }
    project = sweep.new_project(
        args.workdir or Path(tempfile.mkdtemp(prefix="footprint-")),
        args.archive,
        args.per_class,
        args.image_size,
        defaults.augment.copies,
        defaults.train.epochs,
        overrides,
    )
    started, info = time.perf_counter(), machine()
    rows = run(project, args.experiments)
    scope = f"at most {args.per_class} images per class" if args.per_class else "every image"
    title = f"Memory and disk per run: {args.backbone}, {args.weights.name}, {args.image_size} px, {scope}"
    command = (
        f"python bench/footprint.py --archive {args.archive} --weights {args.weights} "
        f"--backbone {args.backbone} --image-size {args.image_size} --experiments {args.experiments}"
        + (f" --per-class {args.per_class}" if args.per_class else "")
    )
    report(title, rows, command, started, info, args.append, f" Stores: {', '.join(sweep.STORES)} (`du -sb`).")


if __name__ == "__main__":
    main()
