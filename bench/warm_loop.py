"""The warm loop: after a first ``dvc repro``, change one head parameter and rerun, as a user does all day.

A scratch git + DVC project (this repository's pipeline, as ``sweep.py`` builds it) on an archive
slice: ``dvc repro`` once, then ``--loops`` times ``dvc exp run -S train.learning_rate=<new value>``
(train -> evaluate -> export rerun; the script stops if any other stage runs) and as many times
``dvc exp run -S ... evaluate``, the documented quicker loop (docs/experiments.md) that leaves export for the experiment
kept. Each run's wall time, split into its stages' (first to last sight of the stage's process)
and DVC's own, and the median over the loops.

    python bench/warm_loop.py --archive flower_photos.tgz --per-class 40 --image-size 299 --loops 3
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sweep import RERUN, commit, new_project, set_args, stage_breakdown, stages_run, timed_dvc

from common import add_project_arguments, add_slice_arguments, load_average, machine, report

LEARNING_RATES = (0.0005, 0.0007, 0.0015, 0.002, 0.0025, 0.0004, 0.0006, 0.0008)  # none is params.yaml's 0.001


def loop(project: Path, overrides: dict, target: list[str], expected: list[str]) -> tuple[float, str]:
    run = timed_dvc(project, "exp", "run", *set_args(overrides), *target)
    if stages_run(run.output) != expected:
        sys.exit(f"dvc exp run {target} ran {stages_run(run.output)}, not {expected}:\n{run.output[-3000:]}")
    return run.seconds, stage_breakdown(run)


def run(project: Path, loops: int) -> list[tuple[str, str]]:
    first = timed_dvc(project, "repro")
    commit(project, "baseline")
    rows = [("first run: dvc repro, wall", f"{first.seconds:.1f} s ({stage_breakdown(first)})")]
    rates = iter(LEARNING_RATES)
    for name, target, expected in (
        ("dvc exp run -S train.learning_rate=…", [], RERUN),
        ("dvc exp run -S train.learning_rate=… evaluate", ["evaluate"], RERUN[:2]),
    ):
        seconds = []
        for _ in range(loops):
            overrides = {"train.learning_rate": next(rates)}
            wall, breakdown = loop(project, overrides, target, expected)
            seconds.append(wall)
            rows.append(
                (f"{name.replace('…', str(overrides['train.learning_rate']))}, wall", f"{wall:.1f} s ({breakdown})")
            )
        rows.append((f"{name}: median of {loops}", f"{statistics.median(seconds):.1f} s"))
    rows.append(("load average (1 min) after", load_average()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_arguments(parser)
    parser.add_argument("--epochs", type=int, default=10, help="head epochs")
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--weights", default="none", help="model.weights: none or a weights file")
    parser.add_argument("--loops", type=int, default=3, help="runs of each loop (at most 4)")
    add_project_arguments(parser)
    args = parser.parse_args()
    if not 1 <= args.loops <= len(LEARNING_RATES) // 2:
        parser.error(f"--loops must be 1..{len(LEARNING_RATES) // 2}")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="warm-"))
    project = new_project(
        root,
        args.archive,
        args.per_class,
        args.image_size,
        args.copies,
        args.epochs,
        {"model.backbone": args.backbone, "model.weights": args.weights},
    )
    started, info = time.perf_counter(), machine()
    rows = run(project, args.loops)
    command = (
        f"python bench/warm_loop.py --archive {args.archive} --per-class {args.per_class} --image-size "
        f"{args.image_size} --copies {args.copies} --epochs {args.epochs} --backbone {args.backbone} "
        f"--weights {args.weights} --loops {args.loops}"
    )
    title = (
        f"Warm loop ({args.backbone}, {args.image_size} px, {args.per_class} per class, {args.epochs} epochs, "
        f"model.weights={Path(args.weights).name})"
    )
    report(title, rows, command, started, info, args.append)


if __name__ == "__main__":
    main()
