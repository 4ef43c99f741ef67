"""The warm loop: after a first ``dvc repro``, change one head parameter and rerun, as a user does all day.

A scratch git + DVC project (this repository's pipeline, as ``sweep.py`` builds it) on an archive
slice: ``dvc repro`` once, then ``--loops`` times ``dvc exp run -S train.learning_rate=<new value>``
(train -> evaluate -> export rerun; the script stops if any other stage runs) and as many times
``dvc exp run -S ... evaluate``, the documented quicker loop (docs/experiments.md) that leaves export for the experiment
kept. Each run's wall time, split into its stages' (first to last sight of the stage's process)
and DVC's own, and the median over the loops. With ``--warm``, each loop also runs with a warm worker
waiting (``make warm``, pipeline/warm.py), cold and warm alternately, the order swapped every round.

    python bench/warm_loop.py --archive flower_photos.tgz --per-class 40 --image-size 299 --loops 3 --warm
"""

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweep import RERUN, commit, env, new_project, set_args, stage_breakdown, stages_run, timed_dvc

from common import add_project_arguments, add_slice_arguments, load_average, machine, report

# none is params.yaml's 0.001; one per run: loops x 2 loop kinds x (cold, warm)
LEARNING_RATES = (0.0005, 0.0007, 0.0015, 0.002, 0.0025, 0.0004, 0.0006, 0.0008, 0.0009, 0.0012, 0.0013, 0.0014)
LOOPS: tuple[tuple[str, list[str], list[str]], ...] = (
    ("dvc exp run -S train.learning_rate=…", [], RERUN),
    ("dvc exp run -S train.learning_rate=… evaluate", ["evaluate"], RERUN[:2]),
)


def loop(project: Path, overrides: dict, target: list[str], expected: list[str]) -> tuple[float, str]:
    run = timed_dvc(project, "exp", "run", *set_args(overrides), *target)
    if stages_run(run.output) != expected:
        sys.exit(f"dvc exp run {target} ran {stages_run(run.output)}, not {expected}:\n{run.output[-3000:]}")
    return run.seconds, stage_breakdown(run)


@contextlib.contextmanager
def warm_worker(project: Path):
    """A warm worker waiting for the project's stages (make warm) while the block runs, then stopped (make cold)."""

    def warm(action: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "pipeline.warm", action],
            cwd=project,
            env=env(project),
            check=True,
            capture_output=True,
        )

    warm("start")
    try:
        yield
    finally:
        warm("stop")


def run(project: Path, loops: int, modes: tuple[str, ...]) -> list[tuple[str, str]]:
    first = timed_dvc(project, "repro")
    commit(project, "baseline")
    rows = [("first run: dvc repro, wall", f"{first.seconds:.1f} s ({stage_breakdown(first)})")]
    rates = iter(LEARNING_RATES)
    for name, target, expected in LOOPS:
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_ in range(loops):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                overrides = {"train.learning_rate": next(rates)}
                with warm_worker(project) if mode == "warm" else contextlib.nullcontext():
                    wall, breakdown = loop(project, overrides, target, expected)
                seconds[mode].append(wall)
                label = name.replace("…", str(overrides["train.learning_rate"]))
                rows.append((f"{label}, {mode}, wall", f"{wall:.1f} s ({breakdown})"))
        for mode in modes:
            rows.append((f"{name}, {mode}: median of {loops}", f"{statistics.median(seconds[mode]):.1f} s"))
    rows.append(("load average (1 min) after", load_average()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_arguments(parser)
    parser.add_argument("--epochs", type=int, default=10, help="head epochs")
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--weights", default="none", help="model.weights: none or a weights file")
    parser.add_argument("--loops", type=int, default=3, help="runs of each loop (at most 6, or 3 with --warm)")
    parser.add_argument("--warm", action="store_true", help="also run each loop with a warm worker waiting")
    add_project_arguments(parser)
    args = parser.parse_args()
    modes = ("cold", "warm") if args.warm else ("cold",)
    most = len(LEARNING_RATES) // (len(LOOPS) * len(modes))
    if not 1 <= args.loops <= most:
        parser.error(f"--loops must be 1..{most}")
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
    rows = run(project, args.loops, modes)
    command = (
        f"python bench/warm_loop.py --archive {args.archive} --per-class {args.per_class} --image-size "
        f"{args.image_size} --copies {args.copies} --epochs {args.epochs} --backbone {args.backbone} "
        f"--weights {args.weights} --loops {args.loops}{' --warm' if args.warm else ''}"
    )
    title = (
        f"Warm loop ({args.backbone}, {args.image_size} px, {args.per_class} per class, {args.epochs} epochs, "
        f"model.weights={Path(args.weights).name})"
    )
    report(title, rows, command, started, info, args.append)


if __name__ == "__main__":
    main()
