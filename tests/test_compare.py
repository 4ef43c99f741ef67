"""`make exp` then `make compare` as a user runs them after a first `make run`: the grid reuses the
workspace's data stages, and the comparison is one readable table per dataset, best first."""

import json
import re
import sys

import pytest
from test_warm import ran_warm, workers

from conftest import SMALL_BACKBONE, run, set_params, stages_run
from pipeline.cli import UserError
from pipeline.tools.experiments import parse_grid


def test_grid_is_split_like_dvc_sweeps_without_a_shell():
    assert parse_grid("-S train.epochs=1,2 -S augment.crop_scale=[0.5,1.0],[0.8,1.0]") == [
        ["train.epochs=1", "train.epochs=2"],
        ["augment.crop_scale=[0.5,1.0]", "augment.crop_scale=[0.8,1.0]"],
    ]
    # What a shell would run stays a literal value, for params.yaml's validation to refuse.
    assert parse_grid("-S 'data.url=$(touch x)'") == [["data.url=$(touch x)"]]
    for bad in ["train.epochs=1,2", "-S train.epochs", "-S =1", "-X a=1"]:
        with pytest.raises(UserError, match="EXP_GRID"):
            parse_grid(bad)


@pytest.mark.e2e
def test_grid_after_a_first_run_reuses_its_data_and_compares_best_first(project):
    set_params(project, **SMALL_BACKBONE)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "project"], project)  # a clone: dvc.lock not committed
    run(["dvc", "repro"], project)  # what `make run` runs

    grid = run([sys.executable, "-m", "pipeline.tools.experiments", "--grid", "-S train.epochs=1,2"], project)
    assert set(stages_run(grid.stdout)) == {"train", "evaluate", "export"}, grid.stdout
    assert grid.stdout.count("Running stage 'train'") == 2
    # ... each TensorFlow stage in a warm worker (pipeline/warm.py), stopped with the grid.
    assert ran_warm(project) == ["train 0", "evaluate 0", "export 0"] * 2
    assert re.search(r"^stopped the warm worker \d+$", grid.stdout, re.M) and workers(project) == []

    table = run([sys.executable, "-m", "pipeline.tools.compare"], project).stdout.splitlines()
    assert table[1].startswith("  data.url ") and all(len(line) <= 120 for line in table[2:]), table
    header = next(i for i, line in enumerate(table) if line.startswith("experiment "))
    rows = table[header + 1 : table.index("", header)]
    assert len(rows) == 2 and {re.search(r"train\.epochs=(\d)", r).group(1) for r in rows} == {"1", "2"}, table
    accuracies = [float(row.split()[1]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert all(re.fullmatch(r"[0-9a-f]{8}", run_id) for run_id in run_ids(table[header], rows)), table
    assert table[0].startswith("images: 2 result(s), best test accuracy first")
    # The workspace holds the best one, by name, with the params it ran with.
    best = rows[0].split()[0]
    assert f"the workspace now holds the best experiment, {best}" in grid.stdout
    summary = run([sys.executable, "-m", "pipeline.tools.summary"], project).stdout
    epochs = re.search(r"train\.epochs=(\d)", rows[0]).group(1)
    assert f"settings that differ from the committed params.yaml: train.epochs={epochs} (committed 3)" in summary

    # Committed after a plain `dvc repro` (the run named after its params, not after an experiment),
    # the commit's row has its MLflow run too.
    run(["git", "checkout", "params.yaml"], project)
    run(["dvc", "repro"], project)  # the first run's outputs, from DVC's run cache
    run(["git", "add", "params.yaml", "dvc.lock", "eval"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    table = run([sys.executable, "-m", "pipeline.tools.compare"], project).stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("experiment "))
    rows = table[header + 1 : table.index("", header)]
    recorded = json.loads((project / "data" / "model" / "mlflow_run.json").read_text())
    assert len(rows) == 1 and run_ids(table[header], rows) == [recorded["run_id"][:8]], table


def run_ids(header: str, rows: list[str]) -> list[str]:
    """The MLflow run column of the table's rows (8 characters of each id)."""
    start = header.index("MLflow run")
    return [row[start : start + 8] for row in rows]
