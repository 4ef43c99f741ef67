"""Shared by the benchmarks: a scratch project outside the repository, timed stage runs with their
peak memory, and a description of the machine.

Stages run as DVC would run them: ``python -m pipeline.<stage>`` in the project folder.
"""

import argparse
import csv
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import psutil

# The benchmarks run as scripts: bench/ and the repository (for pipeline) go on the path first.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from augment_throughput import write_params  # noqa: E402

from pipeline.config import override_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class StageRun:
    seconds: float
    peak_rss_mb: float  # max over time of the summed RSS of the stage and all its child processes
    peak_single_rss_mb: float  # max over time of the largest single process in the tree


def new_workdir(workdir: Path, archive: Path, per_class: int | None, image_size: int, copies: int, epochs: int) -> Path:
    """A project folder outside the repository with params.yaml set for the benchmark slice."""
    workdir = workdir.resolve()
    if workdir.is_relative_to(REPO):
        sys.exit("--workdir must be outside the repository")
    workdir.mkdir(parents=True, exist_ok=True)
    write_params(workdir, archive.resolve(), copies, image_size)
    override_params(
        workdir / "params.yaml",
        {
            "data.max_per_class": per_class,
            "train.epochs": epochs,
            # Exactly `epochs` epochs, as the tutorial recipe runs.
            "train.early_stopping_patience": None,
        },
    )
    return workdir


def add_slice_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the data slice and sizes, shared by every benchmark."""
    parser.add_argument("--archive", type=Path, required=True, help="the flowers archive (.tgz)")
    parser.add_argument("--per-class", type=int, default=40, help="data.max_per_class")
    parser.add_argument("--image-size", type=int, default=299, help="model.image_size (inception_v3)")
    parser.add_argument("--copies", type=int, default=2, help="augment.copies")


def add_project_arguments(parser: argparse.ArgumentParser) -> None:
    """The scratch project's folder and the results file, for the benchmarks that build a DVC project."""
    parser.add_argument("--workdir", type=Path, help="an empty scratch folder (default: a new temporary one)")
    parser.add_argument("--append", type=Path, help="append the section to this file (bench/results.md)")


def stage_env(workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PIPELINE_CACHE_DIR": str(workdir / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
    }


def run_stage(name: str, workdir: Path) -> StageRun:
    """Run ``python -m pipeline.<name>`` in ``workdir``, polling the RSS of its process tree
    (ProcessPoolExecutor workers included) every POLL_SECONDS."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", f"pipeline.stages.{name}"],
        cwd=workdir,
        env=stage_env(workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peaks = {"sum": 0, "single": 0}
    done = threading.Event()

    def poll():
        root = psutil.Process(process.pid)
        while not done.is_set():
            rss = []
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        rss.append(proc.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            if rss:
                peaks["sum"] = max(peaks["sum"], sum(rss))
                peaks["single"] = max(peaks["single"], max(rss))
            done.wait(POLL_SECONDS)

    output, seconds = finish_polled(process, poll, done, started, f"pipeline.stages.{name}")
    return StageRun(seconds, peaks["sum"] / 2**20, peaks["single"] / 2**20)


def finish_polled(
    process: subprocess.Popen, poll, done: threading.Event, started: float, what: str
) -> tuple[str, float]:
    """Wait for ``process`` with ``poll`` (which returns once ``done`` is set) running beside it in a
    thread; its output and wall time since ``started``; exit naming ``what`` if it failed."""
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    output = process.communicate()[0]
    seconds = time.perf_counter() - started
    done.set()
    poller.join()
    if process.returncode:
        sys.exit(f"{what} failed ({process.returncode}):\n{output[-3000:]}")
    return output, seconds


def manifest_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def machine() -> dict[str, str]:
    import keras
    import tensorflow as tf

    cpu = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "GPU": ", ".join(g.name for g in gpus) or "none",
        "TensorFlow": tf.__version__,
        "Keras": keras.__version__,
        "Python": platform.python_version(),
        "load average (1, 5, 15 min) at start": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}"


QUOTE = "'"


def placeholders(command: str) -> str:
    """``command`` as results.md shows it: each absolute path (the archive, the weights, a scratch folder)
    as ``<its name>``: a reader has them elsewhere."""
    return re.sub(r"'/[^']*'|(?<![\w<])/[^\s`'\"]+", lambda path: f"<{PurePath(path[0].strip(QUOTE)).name}>", command)


def section(
    title: str, rows: Sequence[Sequence[str]], command: str, header: Sequence[str] = ("figure", "value")
) -> str:
    """A results.md section: a table of ``rows`` under ``header``, then the command reproducing it."""
    lines = [f"## {title}", "", f"| {' | '.join(header)} |", f"|{' --- |' * len(header)}"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join([*lines, "", f"Reproduce: `{placeholders(command)}`", ""])


def report(
    title: str,
    rows: Sequence[Sequence[str]],
    command: str,
    started: float,
    info: dict[str, str],
    append: Path | None,
    note: str = "",
    header: Sequence[str] = ("figure", "value"),
) -> None:
    """Print the results.md section (when and how long, the machine's load, ``note``, the table) and
    append it to ``append``."""
    intro = (
        f"On {time.strftime('%Y-%m-%d')} in {(time.perf_counter() - started) / 60:.1f} min; load average "
        f"(1, 5, 15 min) at start {info['load average (1, 5, 15 min) at start']}.{note}"
    )
    heading, table = section(title, rows, command, header).split("\n\n", 1)
    text = f"{heading}\n\n{intro}\n\n{table}"
    print(text)
    if append:
        with open(append, "a") as fh:
            fh.write("\n" + text)
