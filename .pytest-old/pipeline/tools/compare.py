"""`make compare`: the DVC experiments, best first, and the matching MLflow runs side by side.

MLflow runs are named after their DVC experiment, so the two tables line up by name.
Usage: python -m pipeline.tools.compare [--metric test_accuracy] [--max-runs 20]
"""

import argparse
import subprocess

import pandas as pd

from pipeline.cli import UserError, run_stage
from pipeline.config import load_config
from pipeline.report import tracking

COLUMNS = {
    "tags.mlflow.runName": "run name",
    "metrics.test_accuracy": "test acc",
    "metrics.test_macro_f1": "macro F1",
    "metrics.val_accuracy": "val acc",
    "params.model.backbone": "backbone",
    "params.model.image_size": "size",
    "params.train.epochs": "epochs",
    "params.train.learning_rate": "lr",
    "start_time": "started",
    "run_id": "run id",
}


def mlflow_runs(experiment_name: str, metric: str, max_runs: int, store: str) -> pd.DataFrame:
    runs = tracking.finished_runs(experiment_name, metric, max_runs)
    if runs is None:
        raise UserError(f"no MLflow experiment '{experiment_name}' at {store}: run `make run` first")
    present = [c for c in COLUMNS if c in runs.columns]
    return runs[present].rename(columns=COLUMNS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--metric", default="test_accuracy", help="MLflow metric to sort by")
    parser.add_argument("--max-runs", type=int, default=20)
    args = parser.parse_args(argv)
    cfg = load_config()
    store = tracking.use_project_store()
    print("DVC experiments, best test accuracy first:")
    subprocess.run(["dvc", "exp", "show", "--no-pager", "--only-changed", "--sort-by",
                    "eval/metrics.json:accuracy", "--sort-order", "desc"], check=False)
    print(f"\nMLflow runs in '{cfg.experiment_name}' ({store}), best {args.metric} first:")
    table = mlflow_runs(cfg.experiment_name, args.metric, args.max_runs, store)
    print(table.to_string(index=False) if len(table) else "(no finished runs)")


if __name__ == "__main__":
    run_stage(main)
