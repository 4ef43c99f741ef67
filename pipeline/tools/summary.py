"""`make run`'s last lines: what the run scored and where to look next.

Reads only files the stages wrote (``eval/metrics.json``, ``reports/label_issues.csv``,
``data/model/mlflow_run.json``, the stages' wall times in ``pipeline.paths.STAGE_TIMES``), the config
and the committed params.yaml, so it runs in a second and works on any checkout whose outputs are
present (`dvc pull`). ``dvc metrics show`` still lists every metric.
"""

import csv
from typing import Any

from pipeline.cli import UserError, run_stage
from pipeline.config import committed_params, differences, load_config
from pipeline.files import read_json
from pipeline.paths import LABEL_ISSUES_REPORT, METRICS, MLFLOW_RUN_FILE, PLOTS_DIR, STAGE_TIMES
from pipeline.report.metrics import interval_warning
from pipeline.report.mlflow_ui import runs_url

UI_URL = "http://127.0.0.1:5000"  # make ui's (MLFLOW_PORT's default)


def lines() -> list[str]:
    cfg = load_config()
    if not METRICS.is_file():
        raise UserError(f"{METRICS} is missing: run the pipeline first (make run)")
    scores = read_json(METRICS)
    out = [
        f"test accuracy {with_interval(scores['accuracy'], scores['accuracy_ci95'])}, macro F1 "
        f"{with_interval(scores['macro']['f1'], scores['macro_f1_ci95'])}, ECE {scores['ece']:.3f} "
        f"on {scores['test_images']} test images (95 % intervals; {METRICS}, all metrics: dvc metrics show)"
    ]
    warning = interval_warning(scores)
    if warning:
        out.append(warning)
    out.append(f"plots: {PLOTS_DIR}/ (all of them in a browser: dvc plots show)")
    if LABEL_ISSUES_REPORT.is_file():
        with open(LABEL_ISSUES_REPORT, newline="", encoding="utf-8") as fh:
            flagged = sum(1 for _ in csv.DictReader(fh))
        out.append(f"likely mislabelled images: {flagged} in {LABEL_ISSUES_REPORT}")
    if MLFLOW_RUN_FILE.is_file():
        run = read_json(MLFLOW_RUN_FILE)
        model = f"; model {cfg.registered_model_name} (make serve)" if cfg.registered_model_name else ""
        out.append(f"MLflow: run {run['run_id']} in experiment '{cfg.experiment_name}'{model}")
        out.append(f"runs with their test scores: make ui, then {runs_url(UI_URL, run['experiment_id'])}")
    out += settings_lines(cfg.flat())
    if STAGE_TIMES.is_file():
        times = read_json(STAGE_TIMES)
        out.append(
            "stage wall times (each stage's last run; DVC skips unchanged ones): "
            + ", ".join(f"{stage} {entry['seconds']:.1f} s" for stage, entry in times.items())
        )
    return out


def settings_lines(params: dict[str, Any]) -> list[str]:
    """The settings this run used that differ from the committed params.yaml, and what to do next:
    they stay in params.yaml for every later run until reverted."""
    committed = committed_params()
    if committed is None:
        return ["settings: params.yaml (not committed to git yet: commit it to compare later runs against it)"]
    changed = differences(params, committed)
    if not changed:
        return [
            'settings: the committed params.yaml; next: make run SET="train.learning_rate=0.0003" '
            "(one experiment) or make exp (a grid), then make compare"
        ]
    shown = ", ".join(f"{key}={value} (committed {before})" for key, (value, before) in changed.items())
    return [
        f"settings that differ from the committed params.yaml: {shown}",
        "they stay for later runs (git checkout params.yaml to go back); next: make compare, "
        "make promote EXP=<name> to serve the best, make predict PATHS=photo.jpg",
    ]


def with_interval(value: float, interval: dict[str, float]) -> str:
    return f"{value:.3f} ({interval['low']:.3f}-{interval['high']:.3f})"


def main() -> None:
    print("\n".join(lines()))


if __name__ == "__main__":
    run_stage(main)
