"""`make run`'s last lines: what the run scored and where to look next.

Reads only files the stages wrote (``eval/metrics.json``, ``reports/label_issues.csv``,
``data/model/mlflow_run.json``) and the config, so it runs in a second and works on any checkout
whose outputs are present (`dvc pull`). ``dvc metrics show`` still lists every metric.
"""

import csv

from pipeline.cli import UserError, run_stage
from pipeline.config import load_config
from pipeline.files import read_json
from pipeline.paths import LABEL_ISSUES_REPORT, METRICS, MLFLOW_RUN_FILE, PLOTS_DIR


def lines() -> list[str]:
    cfg = load_config()
    if not METRICS.is_file():
        raise UserError(f"{METRICS} is missing: run the pipeline first (make run)")
    scores = read_json(METRICS)
    out = [f"test accuracy {scores['accuracy']:.3f}, macro F1 {scores['macro']['f1']:.3f}, "
           f"ECE {scores['ece']:.3f} on {scores['test_images']} test images "
           f"({METRICS}; all metrics: dvc metrics show)",
           f"plots: {PLOTS_DIR}/ (all of them in a browser: dvc plots show)"]
    if LABEL_ISSUES_REPORT.is_file():
        with open(LABEL_ISSUES_REPORT, newline="", encoding="utf-8") as fh:
            flagged = sum(1 for _ in csv.DictReader(fh))
        out.append(f"likely mislabelled images: {flagged} in {LABEL_ISSUES_REPORT}")
    if MLFLOW_RUN_FILE.is_file():
        run = read_json(MLFLOW_RUN_FILE)
        model = f"; model {cfg.registered_model_name} (make serve)" if cfg.registered_model_name else ""
        out.append(f"MLflow: run {run['run_id']} in experiment '{cfg.experiment_name}'{model}; "
                   "browse with make ui (http://127.0.0.1:5000)")
    out.append("next: make run SET=\"train.learning_rate=0.0003\" (a DVC experiment), make compare, "
               "make predict PATHS=photo.jpg")
    return out


def main() -> None:
    print("\n".join(lines()))


if __name__ == "__main__":
    run_stage(main)
