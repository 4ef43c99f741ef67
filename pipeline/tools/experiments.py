"""`make exp`: a grid of DVC experiments, run one after another in the workspace, then compared.

The grid uses DVC's sweep syntax: ``-S train.learning_rate=0.001,0.003 -S model.head.dropout=0,0.2`` is
four experiments, one per combination. Each is a ``dvc exp run -S ...`` in the workspace, so the
stages its params do not touch (download, prepare, augment, features for a head param) come from
the workspace's last run instead of running again, whether or not ``dvc.lock`` is committed. Once
the grid is done, the workspace holds the best experiment (``dvc exp apply``, best by test accuracy,
then log loss), and the comparison table (``pipeline.tools.compare``) is printed. The grid runs with
a warm worker waiting (``pipeline.warm``), which ends with it unless ``make warm`` started it.

Usage: python -m pipeline.tools.experiments --grid "-S key=a,b [-S key=c,d ...]"
"""

import argparse
import itertools
import re
import shlex
import subprocess

from pipeline import warm
from pipeline.cli import UserError, run_stage
from pipeline.config import load_config
from pipeline.tools import compare

# A comma splits values unless it is inside brackets: "crop_scale=[0.5,1.0],[0.8,1.0]" is two values.
TOP_LEVEL_COMMA = re.compile(r",(?![^\[]*\])")


def parse_grid(grid: str) -> list[list[str]]:
    """``-S a=1,2 -S b=x`` -> [["a=1", "a=2"], ["b=x"]]: per key, its ``key=value`` overrides."""
    words = shlex.split(grid)
    if len(words) % 2 or any(flag != "-S" for flag in words[::2]):
        raise UserError(f"EXP_GRID: expected '-S key=value1,value2' pairs, got {grid!r}")
    axes = []
    for setting in words[1::2]:
        key, equals, values = setting.partition("=")
        if not equals or not key or not values:
            raise UserError(f"EXP_GRID: '{setting}' is not key=value1,value2")
        axes.append([f"{key}={value}" for value in TOP_LEVEL_COMMA.split(values)])
    return axes


def run_grid(axes: list[list[str]]) -> list[str]:
    """Run every combination; the ones that failed, as the overrides they had."""
    combinations = list(itertools.product(*axes))
    failed = []
    for number, overrides in enumerate(combinations, 1):
        print(f"experiment {number}/{len(combinations)}: {' '.join(overrides)}", flush=True)
        args = [arg for override in overrides for arg in ("-S", override)]
        if subprocess.run(["dvc", "exp", "run", *args]).returncode != 0:
            failed.append(" ".join(overrides))
    return failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="DVC sweep overrides: '-S key=a,b -S key2=c,d'")
    args = parser.parse_args(argv)
    axes = parse_grid(args.grid)
    with warm.kept_warm():  # each experiment's TensorFlow stages start about 3.5 s sooner
        failed = run_grid(axes)
    url = load_config().data.url
    rows = [
        r
        for r in compare.rows_of(compare.dvc_experiments())
        if r.name != "workspace" and r.params[compare.GROUPED_BY] == url
    ]
    best = min(rows, key=lambda r: r.rank, default=None)
    if best is not None:
        subprocess.run(["dvc", "exp", "apply", best.name], check=True, capture_output=True)
        print(f"the workspace now holds the best experiment, {best.name} (dvc exp apply {best.name})")
    print("\n".join(compare.readable_tables(compare.DEFAULT_WIDTH)))
    if failed:
        raise UserError(f"{len(failed)} experiment(s) failed: {'; '.join(failed)} (their output is above)")


if __name__ == "__main__":
    run_stage(main)
