"""The warm loop: after a first ``dvc repro``, change one head parameter and rerun, as a user does all day.

A scratch git + DVC project (this repository's pipeline, as ``sweep.py`` builds it) on an archive
slice: ``dvc repro`` once, then ``--loops`` times ``dvc exp run -S train.learning_rate=<new value>``
(train -> evaluate -> export rerun; the script stops if any other stage runs) and as many times
``dvc exp run -S ... evaluate``, the documented quicker loop (docs/experiments.md) that leaves export for the experiment
kept. Each run's wall time, split into its stages' (first to last sight of the stage's process)
and DVC's own, and the median over the loops. With ``--warm``, each loop also runs with a warm worker
waiting (``make warm``, pipeline/warm.py; its spare imported too, as a while after ``make warm``), cold
and warm alternately, the order swapped every round.
With ``--before REV``, a second project holds the pipeline as it was at git revision REV, and each
loop runs warm in both, before and after alternately, the order swapped every round.

    python bench/warm_loop.py --archive flower_photos.tgz --per-class 40 --image-size 299 --loops 3 --warm
"""

import argparse
import contextlib
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from sweep import PROJECT_FILES, RERUN, commit, env, new_project, set_args, stage_breakdown, stages_run, timed_dvc

from common import REPO, add_project_arguments, add_slice_arguments, load_average, machine, report
from pipeline.warm import LOG

SPARE_READY = "spare ready"  # what a spare writes to the worker's log once it has imported

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

    log = project / LOG
    spares_ready = log.read_text().count(SPARE_READY) if log.is_file() else 0
    warm("start")
    # `start` returns once the first worker has imported; its spare imports next (about 3.5 s). A
    # user who typed `make warm` a while ago has both waiting: so does the loop measured here.
    if SPARE_READY in (project / "pipeline" / "warm.py").read_text():  # a revision with spares
        deadline = time.monotonic() + 60
        while log.read_text().count(SPARE_READY) == spares_ready and time.monotonic() < deadline:
            time.sleep(0.1)
    try:
        yield
    finally:
        warm("stop")


def with_pipeline_of(project: Path, revision: str) -> Path:
    """``project`` with the pipeline's files (PROJECT_FILES) as they were at git ``revision``."""
    for name in PROJECT_FILES:
        path = project / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, *PROJECT_FILES], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(project, filter="data")
    return project


def run(variants: dict[str, tuple[Path, bool]], loops: int) -> list[tuple[str, str]]:
    """``variants``: name -> (project, warm), measured alternately."""
    rows = []
    first_runs: dict[Path, str] = {}  # each project once, named by its first variant
    for name, (project, _) in variants.items():
        first_runs.setdefault(project, name)
    for project, name in first_runs.items():
        first = timed_dvc(project, "repro")
        commit(project, "baseline")
        label = "first run: dvc repro" + (f" ({name})" if len(first_runs) > 1 else "")
        rows.append((f"{label}, wall", f"{first.seconds:.1f} s ({stage_breakdown(first)})"))
    rates = iter(LEARNING_RATES)
    names = list(variants)
    for loop_name, target, expected in LOOPS:
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(loops):
            for name in names if round_ % 2 == 0 else names[::-1]:
                project, warm = variants[name]
                overrides = {"train.learning_rate": next(rates)}
                with warm_worker(project) if warm else contextlib.nullcontext():
                    wall, breakdown = loop(project, overrides, target, expected)
                seconds[name].append(wall)
                label = loop_name.replace("…", str(overrides["train.learning_rate"]))
                rows.append((f"{label}, {name}, wall", f"{wall:.1f} s ({breakdown})"))
        for name in names:
            rows.append((f"{loop_name}, {name}: median of {loops}", f"{statistics.median(seconds[name]):.1f} s"))
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
    parser.add_argument("--before", metavar="REV", help="instead: warm, the pipeline at git revision REV vs now")
    add_project_arguments(parser)
    args = parser.parse_args()
    if args.warm and args.before:
        parser.error("--warm or --before, not both")
    kinds = 1 if not (args.warm or args.before) else 2
    most = len(LEARNING_RATES) // (len(LOOPS) * kinds)
    if not 1 <= args.loops <= most:
        parser.error(f"--loops must be 1..{most}")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="warm-"))

    def project(folder: str) -> Path:
        return new_project(
            root / folder,
            args.archive,
            args.per_class,
            args.image_size,
            args.copies,
            args.epochs,
            {"model.backbone": args.backbone, "model.weights": args.weights},
        )

    now = project("now")
    if args.before:
        variants = {
            f"before ({args.before})": (with_pipeline_of(project("before"), args.before), True),
            "now": (now, True),
        }
    else:
        variants = {"cold": (now, False), **({"warm": (now, True)} if args.warm else {})}
    started, info = time.perf_counter(), machine()
    rows = run(variants, args.loops)
    option = " --warm" if args.warm else f" --before {args.before}" if args.before else ""
    command = (
        f"python bench/warm_loop.py --archive {args.archive} --per-class {args.per_class} --image-size "
        f"{args.image_size} --copies {args.copies} --epochs {args.epochs} --backbone {args.backbone} "
        f"--weights {args.weights} --loops {args.loops}{option}"
    )
    title = (
        f"Warm loop ({args.backbone}, {args.image_size} px, {args.per_class} per class, {args.epochs} epochs, "
        f"model.weights={Path(args.weights).name})"
    )
    report(title, rows, command, started, info, args.append)


if __name__ == "__main__":
    main()
