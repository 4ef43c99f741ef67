"""A sweep of 12 head settings as queued DVC experiments vs 12 runs of the keras.io recipe.

A scratch git + DVC project (this repository's pipeline, dvc.yaml and params.yaml copied in) on an
archive slice: ``dvc repro`` first (each stage's wall time and peak RSS, polled; DVC's own time is
the rest); then 12 experiments, learning rate x dropout x label smoothing, queued with
``dvc exp run --queue -S ...`` and run by ``dvc queue start -j 1``. None of the 12 has the
baseline's settings, so DVC's run cache cannot hand back a trained model: each one trains.
(One head setting at a time in the workspace, the warm loop, is ``warm_loop.py``'s.) Every experiment's log must
show only train, evaluate and export running, and ``dvc exp show`` the baseline's features as its
input (the script stops otherwise): the sweep reuses the cached features. The DVC cache and the
MLflow store (``mlartifacts/``, ``mlflow.db``) are measured before and after the queue.

The recipe (``recipe.py``, same split, backbone, size, epochs and batch) runs once and is multiplied
by 12 (``--recipe-seconds`` takes an earlier figure instead). Our early stopping is off, so both
train exactly ``--epochs`` epochs.

    python bench/sweep.py --archive flower_photos.tgz --per-class 40 --image-size 299 --epochs 10
"""

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import psutil

import recipe
from common import (
    REPO,
    StageRun,
    add_project_arguments,
    add_slice_arguments,
    finish_polled,
    load_average,
    machine,
    new_workdir,
    report,
)
from pipeline.config import load_config, override_params
from pipeline.model.backbones import BACKBONES

PROJECT_FILES = ("pipeline", "dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config")
STORES = (".dvc/cache", "mlartifacts", "mlflow.db")
RERUN = ["train", "evaluate", "export"]  # what a head setting reruns; everything before is reused
REUSED = ["download", "prepare", "augment", "features", "label_issues"]
GRID = {
    "train.learning_rate": (0.0003, 0.001, 0.003),
    "model.head.dropout": (0.2, 0.5),
    "train.label_smoothing": (0.0, 0.05),
}  # params.yaml: 0.001, 0.2, 0.1
STAGE_COMMAND = re.compile(r"-m pipeline\.stages\.(\w+)")
POLL_SECONDS = 0.1
QUEUE_POLL_SECONDS = 5


@dataclass(frozen=True)
class DvcRun:
    seconds: float  # the whole dvc command
    stages: dict[str, StageRun]  # each stage's process tree, in the order they ran
    output: str
    dvc_after: dict[str, float]  # DVC's own time after each stage, until the next one started (or DVC ended)


def new_project(
    root: Path, archive: Path, per_class: int | None, image_size: int, copies: int, epochs: int, overrides: dict
) -> Path:
    """``root``/project: a git + DVC project holding this repository's pipeline, params set for the slice."""
    project = new_workdir(root / "project", archive, per_class, image_size, copies, epochs)
    override_params(project / "params.yaml", overrides)
    for name in PROJECT_FILES:
        source, target = REPO / name, project / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    with open(project / ".gitignore", "a") as fh:
        fh.write("/recipe/\n")  # recipe.py's links to the split
    for command in (["init", "-q"], ["config", "user.email", "bench@example.com"], ["config", "user.name", "bench"]):
        subprocess.run(["git", *command], cwd=project, check=True)
    return project


def env(project: Path) -> dict[str, str]:
    """What a user has after `make setup`: the venv on PATH, MLflow's default store in the project."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PYTHONPATH"))}
    return {
        **kept,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{kept['PATH']}",
        "PYTHONUNBUFFERED": "1",
        "PIPELINE_CACHE_DIR": str(project.parent / "cache"),
    }


def dvc(project: Path, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=project, env=env(project), capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


def commit(project: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=project, check=True)


def stage_sizes(root: psutil.Process, commands: dict[int, str | None]) -> dict[str, list[int]]:
    """The RSS of every process under ``root``, by the stage (``python -m pipeline.<stage>``) it is
    part of: the stage's process or a descendant (a ProcessPoolExecutor worker)."""
    parents, sizes = {}, {}
    for proc in root.children(recursive=True):
        try:
            if proc.pid not in commands:
                match = STAGE_COMMAND.search(" ".join(proc.cmdline()))
                commands[proc.pid] = match and match[1]
            parents[proc.pid], sizes[proc.pid] = proc.ppid(), proc.memory_info().rss
        except psutil.Error:
            pass
    by_stage: dict[str, list[int]] = {}
    for pid, rss in sizes.items():
        ancestor = pid
        while ancestor in parents and not commands.get(ancestor):
            ancestor = parents[ancestor]
        if commands.get(ancestor):
            by_stage.setdefault(cast(str, commands[ancestor]), []).append(rss)
    return by_stage


def timed_dvc(project: Path, *args: str) -> DvcRun:
    """Run ``dvc args``, polling its process tree every POLL_SECONDS: each stage's wall time (first
    to last sight of its process) and peak RSS (sum over its processes, and the largest one)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        ["dvc", *args], cwd=project, env=env(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: dict[str, list[float]] = {}  # stage: first sight, last sight, peak sum, peak single (bytes)
    done = threading.Event()

    def poll():
        root, commands = psutil.Process(process.pid), {}
        while not done.is_set():
            try:
                by_stage = stage_sizes(root, commands)
            except psutil.Error:
                return
            now = time.perf_counter()
            for name, sizes in by_stage.items():
                first, _, total, single = seen.get(name, (now, now, 0, 0))
                seen[name] = [first, now, max(total, sum(sizes)), max(single, max(sizes))]
            done.wait(POLL_SECONDS)

    output, seconds = finish_polled(process, poll, done, started, f"dvc {' '.join(args)}")
    stages = {
        name: StageRun(last - first, total / 2**20, single / 2**20)
        for name, (first, last, total, single) in seen.items()
    }
    starts = [first for first, *_ in seen.values()][1:] + [started + seconds]
    dvc_after = {name: start - last for (name, (_, last, *_)), start in zip(seen.items(), starts, strict=True)}
    return DvcRun(seconds, stages, output, dvc_after)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def size(path: Path) -> int:
    if not path.exists():
        return 0
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def disk(project: Path) -> dict[str, int]:
    return {name: size(project / name) for name in STORES}


def growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in STORES}


def mib(sizes: dict[str, int]) -> str:
    return ", ".join(f"{name} {sizes[name] / 2**20:.1f}" for name in STORES) + " MiB"


def settings() -> list[dict]:
    return [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]


def set_args(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]


def queue_rows(project: Path) -> list[list[str]]:
    """`dvc queue status`: a [task, name, created..., status] row per experiment."""
    lines = dvc(project, "queue", "status").splitlines()
    return [line.split() for line in lines[1:] if line.strip() and not line.startswith("Worker")]


def run_queue(project: Path, count: int) -> tuple[float, list[str]]:
    """Start the queue, one job at a time, and wait for its ``count`` experiments: the wall time
    and their names."""
    started = time.perf_counter()
    dvc(project, "queue", "start", "-j", "1")
    done: list[str] = []
    while len(done) < count:
        time.sleep(QUEUE_POLL_SECONDS)
        rows = queue_rows(project)
        if failed := [row[1] for row in rows if row[-1] == "Failed"]:
            sys.exit(f"queued experiments failed: {failed}; see `dvc queue logs <name>` in {project}")
        done = [row[1] for row in rows if row[-1] == "Success"]
    return time.perf_counter() - started, done


def features_hashes(project: Path) -> tuple[str, dict[str, str]]:
    """From `dvc exp show`: the data/features hash of the baseline commit, and of each experiment on it."""
    _, baseline = json.loads(dvc(project, "exp", "show", "--json"))  # the workspace, then HEAD
    revs = [rev for experiment in baseline.get("experiments") or [] for rev in experiment["revs"]]
    return (
        baseline["data"]["deps"]["data/features"]["hash"],
        {rev["name"]: rev["data"]["deps"]["data/features"]["hash"] for rev in revs},
    )


def check_reuse(project: Path, names: list[str]) -> list[tuple[str, str]]:
    """Each queued experiment skipped the stages before train (unchanged) and ran train, evaluate and
    export only, on the baseline's features."""
    logs = {name: dvc(project, "queue", "logs", name) for name in names}
    wrong = {
        name: (stages_run(log), re.findall(r"Stage '(\w+)' didn't change, skipping", log)) for name, log in logs.items()
    }
    wrong = {name: found for name, found in wrong.items() if found != (RERUN, REUSED)}
    baseline, hashes = features_hashes(project)
    other = {name: hashes.get(name) for name in names if hashes.get(name) != baseline}
    if wrong or other:
        sys.exit(f"the sweep did not reuse the features: (stages run, skipped) {wrong}, other features {other}")
    return [
        (
            "stages each queued experiment ran (from `dvc queue logs`)",
            f'{" → ".join(RERUN)} in all {len(names)}; {", ".join(REUSED)}: "didn\'t change, skipping"',
        ),
        (
            "data/features each experiment used (from `dvc exp show`)",
            f"the baseline's ({baseline[:8]}) in all {len(names)}",
        ),
    ]


def recipe_seconds(project: Path, epochs: int) -> float:
    cfg = load_config(project / "params.yaml")
    weights = None if cfg.model.weights == "none" else cfg.model.weights
    return recipe.run(
        project,
        BACKBONES[cfg.model.backbone].application,
        weights,
        cfg.model.input_size,
        epochs,
        cfg.train.batch_size,
        cfg.seed,
    )["total"]


def stage_breakdown(run: DvcRun) -> str:
    own = run.seconds - sum(stage.seconds for stage in run.stages.values())
    return " + ".join([*(f"{name} {stage.seconds:.1f}" for name, stage in run.stages.items()), f"DVC {own:.1f}"])


def run(project: Path, epochs: int, recipe_figure: float | None) -> list[tuple[str, str]]:
    first = timed_dvc(project, "repro")
    commit(project, "baseline")
    baseline = disk(project)
    rows = [
        ("first run: dvc repro, wall", f"{first.seconds:.1f} s ({stage_breakdown(first)})"),
        ("stores after it (DVC cache, MLflow artifacts, MLflow database)", mib(baseline)),
    ]
    grid = settings()
    started = time.perf_counter()
    for overrides in grid:
        dvc(project, "exp", "run", "--queue", *set_args(overrides))
    queued = time.perf_counter() - started
    before = disk(project)
    ran, names = run_queue(project, len(grid))
    rows += check_reuse(project, names)
    total, whole = queued + ran, growth(before, disk(project))
    mine = recipe_figure or recipe_seconds(project, epochs)
    grid_text = " x ".join(f"{key} {list(values)}" for key, values in GRID.items())
    rows += [
        (
            f"sweep: {len(grid)} queued experiments ({grid_text}), wall",
            f"{total:.0f} s (queueing {queued:.0f} s + dvc queue start -j 1 until done {ran:.0f} s) = "
            f"{total / len(grid):.1f} s per experiment",
        ),
        (
            f"recipe: {len(grid)} runs (one run timed{'' if recipe_figure is None else ' earlier'}, x {len(grid)}: "
            "extrapolated)",
            f"{len(grid) * mine:.0f} s ({mine:.1f} s per run)",
        ),
        (f"speed-up, sweep (recipe x {len(grid)} / ours)", f"{len(grid) * mine / total:.1f}x"),
        (f"stores' growth over the {len(grid)} experiments", mib(whole)),
        ("stores' growth per experiment (mean)", mib({name: whole[name] // len(grid) for name in STORES})),
        ("load average (1 min) after", load_average()),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_arguments(parser)
    parser.add_argument("--epochs", type=int, default=10, help="head epochs, both recipes")
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument(
        "--recipe-seconds",
        type=float,
        help="the recipe's wall time at these settings, measured earlier (default: run it once)",
    )
    add_project_arguments(parser)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sweep-"))
    project = new_project(
        root, args.archive, args.per_class, args.image_size, args.copies, args.epochs, {"model.backbone": args.backbone}
    )
    started, info = time.perf_counter(), machine()
    rows = run(project, args.epochs, args.recipe_seconds)
    command = (
        f"python bench/sweep.py --archive {args.archive} --per-class {args.per_class} --image-size "
        f"{args.image_size} --copies {args.copies} --epochs {args.epochs} --backbone {args.backbone}"
        + (f" --recipe-seconds {args.recipe_seconds}" if args.recipe_seconds else "")
    )
    title = (
        f"A {len(settings())}-point sweep of queued DVC experiments vs the keras.io recipe ({args.backbone}, "
        f"{args.image_size} px, {args.per_class} per class, {args.epochs} epochs, model.weights=none)"
    )
    report(title, rows, command, started, info, args.append)


if __name__ == "__main__":
    main()
