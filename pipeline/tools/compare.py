"""`make compare`: the DVC experiments of this commit, one table per dataset, best first.

Each row is an experiment (and the workspace, when it has results): its test accuracy with the 95 %
interval evaluate wrote, macro F1, ECE, the number of test images, the params it changed against
the committed params.yaml, and its MLflow run (runs are named after their DVC experiment; the
commit's, a plain `dvc repro`, after its params: ``Config.run_name``). Runs of different datasets
(``data.url``) are never ranked together. The table fits 120 columns.
``--all`` prints DVC's own wide table (``dvc exp show``) and the MLflow runs instead.

Usage: python -m pipeline.tools.compare [--all] [--width 120]
"""

import argparse
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cli import UserError, run_stage
from pipeline.config import Config, committed_params, differences, flatten
from pipeline.files import read_json
from pipeline.paths import METRICS, MLFLOW_RUN_FILE
from pipeline.report import tracking

PARAMS_FILE = "params.yaml"
GROUPED_BY = "data.url"  # one table per value
DEFAULT_WIDTH = 120


@dataclass
class Row:
    """One experiment's results, as `dvc exp show --json` gives them."""

    name: str
    tree: dict[str, Any]  # its params.yaml
    metrics: dict[str, Any]
    changed: list[str] = field(default_factory=list)
    run: str = ""

    @property
    def params(self) -> dict[str, Any]:
        return flatten(self.tree)

    @property
    def config(self) -> Config:
        return Config.model_validate(self.tree)

    @property
    def rank(self) -> tuple[float, float]:
        """Best first: accuracy, then log loss (lower is better)."""
        return (-self.metrics.get("accuracy", -1.0), self.metrics.get("log_loss", float("inf")))


def dvc_experiments() -> list[dict]:
    shown = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise UserError(f"dvc exp show failed: {shown.stderr.strip().splitlines()[-1] if shown.stderr.strip() else ''}")
    return json.loads(shown.stdout or "[]")


def rows_of(shown: list[dict]) -> list[Row]:
    """The workspace, the baseline commit and its experiments that have evaluate's metrics."""
    rows = []
    for top in shown:
        entries = [("workspace" if top.get("rev") == "workspace" else top.get("name") or top["rev"][:7], top)]
        entries += [(e.get("name") or e["revs"][0]["rev"][:7], e["revs"][0]) for e in top.get("experiments") or []]
        for name, entry in entries:
            data = entry.get("data") or {}
            metrics = ((data.get("metrics") or {}).get(str(METRICS)) or {}).get("data")
            params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data")
            if metrics and params and "accuracy" in metrics:
                rows.append(Row(name, params, metrics))
    # After `dvc exp run` the workspace holds that experiment's results: list them once, by name.
    named = [(r.tree, r.metrics) for r in rows if r.name != "workspace"]
    return [r for r in rows if r.name != "workspace" or (r.tree, r.metrics) not in named]


def changed_params(params: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    return [f"{key}={value}" for key, (value, _) in differences(params, reference).items() if key != GROUPED_BY]


def interval(metrics: dict[str, Any], name: str) -> str:
    """`` (0.88-0.93)`` from evaluate's 95 % interval of ``name``, or "" where there is none."""
    bounds = metrics.get(f"{name}_ci95")
    return f" ({bounds['low']:.2f}-{bounds['high']:.2f})" if bounds else ""


def mlflow_run_ids(experiment_name: str) -> dict[str, str]:
    """Run name -> run id of the finished runs of ``experiment_name`` (of a name run again, e.g. by
    ``dvc repro -f``, the newest); the workspace's run from its model."""
    ids = {}
    runs = tracking.finished_runs(experiment_name, "test_accuracy", 1000)
    if runs is not None and len(runs):
        newest_last = runs.sort_values("start_time")
        ids = dict(zip(newest_last["tags.mlflow.runName"], newest_last["run_id"]))
    if Path(MLFLOW_RUN_FILE).is_file():
        ids["workspace"] = read_json(MLFLOW_RUN_FILE)["run_id"]
    return ids


def table(rows: list[Row], width: int) -> list[str]:
    """Fixed columns, then the changed params cut to what is left of ``width``."""
    header = ["experiment", "accuracy (95% CI)", "macro F1", "ECE", "test imgs", "MLflow run"]
    cells = [
        [
            r.name,
            f"{r.metrics['accuracy']:.3f}{interval(r.metrics, 'accuracy')}",
            f"{r.metrics['macro']['f1']:.3f}",
            f"{r.metrics['ece']:.3f}",
            str(r.metrics["test_images"]),
            r.run[:8],
        ]
        for r in rows
    ]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    rest = max(width - sum(widths) - 2 * len(widths), 10)
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  changed params"]
    for row, c in zip(rows, cells):
        changed = ", ".join(row.changed) or "-"
        changed = changed if len(changed) <= rest else changed[: rest - 1] + "…"
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + changed)
    return lines


def readable_tables(width: int) -> list[str]:
    rows = rows_of(dvc_experiments())
    if not rows:
        raise UserError("no experiment has results yet: run `make run` (then `make exp` for a grid)")
    reference = committed_params() or rows[0].params
    groups: dict[str, list[Row]] = {}
    for row in rows:
        row.changed = changed_params(row.params, reference)
        groups.setdefault(str(row.params.get(GROUPED_BY)), []).append(row)
    out = []
    for url, group in groups.items():
        cfg = group[0].config  # the dataset's name and MLflow experiment follow from its params
        name = cfg.dataset_name
        ids = mlflow_run_ids(cfg.experiment_name)
        for row in group:
            row.run = ids.get(row.name) or ids.get(row.config.run_name, "")
        group.sort(key=lambda r: r.rank)
        heading = f"{name}: {len(group)} result(s), best test accuracy first"
        out += [heading, f"  data.url {url}", *table(group, width), ""]  # a URL may be wider than the table
    out.append("details: dvc exp diff <a> <b>; serve one: make promote EXP=<name>")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="DVC's full table and the MLflow runs instead")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="the table's width in characters")
    args = parser.parse_args(argv)
    tracking.use_project_store()
    if args.all:
        subprocess.run(["dvc", "exp", "show", "--no-pager", "--drop", "per_class|weighted"], check=False)
        return
    print("\n".join(readable_tables(args.width)))


def console() -> None:
    """The `transfer-compare` command (pyproject.toml's [project.scripts])."""
    run_stage(main)


if __name__ == "__main__":
    run_stage(main)
