"""The one-page report of a run, ``eval/report.html``: what a reviewer opens or attaches to a review.

Headline metrics with their intervals, the confusion matrix, calibration, the per-class table, the
most confident mistakes by source file name, Grad-CAM, label-issue suspects, the data report, the
params that differ from the committed params.yaml, and the lineage (data hash, DVC experiment,
MLflow run and model versions). Built from the files evaluate and the stages before it wrote, with
Jinja2 (autoescaped: class and file names may hold anything). Pictures are embedded as data URIs,
so the page is one file that opens offline and needs nothing beside it.
"""

import base64
import csv
import os
from pathlib import Path
from typing import Any

import jinja2

from pipeline.config import Config, committed_params, differences
from pipeline.files import atomic_file, read_json
from pipeline.paths import (
    DATA_REPORT,
    DOWNLOAD_REPORT,
    LABEL_ISSUES_REPORT,
    METRICS,
    MLFLOW_RUN_FILE,
    PLOTS_DIR,
    PREDICTIONS,
    RAW_DIR,
)
from pipeline.report.metrics import interval_warning

MISTAKES = 12  # rows of the most confident mistakes table
SUSPECTS = 12  # rows of the label-issue table
PICTURES = [  # (file in eval/plots, heading)
    ("confusion_matrix.png", "Confusion matrix"),
    ("confusion_matrix_normalized.png", "Confusion matrix, each row divided by its class's test images"),
    ("reliability.png", "Calibration"),
    ("training_curves.png", "Training curves"),
    ("top_losses.png", "Most confident mistakes"),
    ("gradcam.png", "Grad-CAM: where the model looked"),
]

TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em }
h1 { font-size: 1.6em } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em }
table { border-collapse: collapse; margin: .5em 0 } td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left }
th { background: #f4f4f4 } td.n { text-align: right; font-variant-numeric: tabular-nums }
.headline { display: flex; gap: 1em; flex-wrap: wrap } .headline div { background: #f4f7fb; padding: .6em 1em; border-radius: 6px }
.headline b { display: block; font-size: 1.5em } img { max-width: 100%; border: 1px solid #eee } .warn { color: #a40 }
code { background: #f4f4f4; padding: 0 .2em }
</style></head><body>
<h1>{{ title }}</h1>
<p>{{ classes|length }} classes: {{ classes|join(", ") }}</p>
<div class="headline">{% for name, value, detail in headline %}<div>{{ name }}<b>{{ value }}</b>{{ detail }}</div>{% endfor %}</div>
{% for warning in warnings %}<p class="warn">{{ warning }}</p>{% endfor %}
<h2>Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>test images</th></tr>
{% for name, row in per_class %}<tr><td>{{ name }}</td><td class="n">{{ "%.3f"|format(row.precision) }}</td>
<td class="n">{{ "%.3f"|format(row.recall) }}</td><td class="n">{{ "%.3f"|format(row.f1) }}</td><td class="n">{{ row.support }}</td></tr>
{% endfor %}</table>
<h2>Most confident mistakes</h2>
{% if mistakes %}<table><tr><th>file</th><th>true</th><th>predicted</th><th>probability</th></tr>
{% for m in mistakes %}<tr><td><code>{{ m.file }}</code></td><td>{{ m.actual }}</td><td>{{ m.predicted }}</td><td class="n">{{ m.confidence }}</td></tr>
{% endfor %}</table>{% else %}<p>None: every test image was classified right.</p>{% endif %}
{% for heading, uri in pictures %}<h2>{{ heading }}</h2><img alt="{{ heading }}" src="{{ uri }}">{% endfor %}
<h2>Likely mislabelled images</h2>
{% if suspects %}<table><tr>{% for column in suspects[0] %}<th>{{ column }}</th>{% endfor %}</tr>
{% for row in suspects %}<tr>{% for value in row.values() %}<td>{{ value }}</td>{% endfor %}</tr>{% endfor %}</table>
{% else %}<p>None flagged.</p>{% endif %}
<h2>Data</h2>
<table>{% for name, value in data %}<tr><th>{{ name }}</th><td>{{ value }}</td></tr>{% endfor %}</table>
<h2>Settings that differ from the committed params.yaml</h2>
{% if changed %}<table><tr><th>param</th><th>this run</th><th>committed</th></tr>
{% for key, (value, before) in changed.items() %}<tr><td><code>{{ key }}</code></td><td>{{ value }}</td><td>{{ before }}</td></tr>{% endfor %}</table>
{% else %}<p>None{% if changed is none %} (params.yaml is not committed){% endif %}.</p>{% endif %}
<h2>Lineage</h2>
<table>{% for name, value in lineage %}<tr><th>{{ name }}</th><td><code>{{ value }}</code></td></tr>{% endfor %}</table>
</body></html>
""")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def headline(scores: dict[str, Any]) -> list[tuple[str, str, str]]:
    def with_interval(name: str, value: float) -> tuple[str, str, str]:
        bounds = scores.get(f"{name}_ci95")
        detail = f"95 % interval {bounds['low']:.3f} to {bounds['high']:.3f}" if bounds else ""
        return (name.replace("_", " "), f"{value:.3f}", detail)

    return [
        with_interval("accuracy", scores["accuracy"]),
        with_interval("macro_f1", scores["macro"]["f1"]),
        ("ECE", f"{scores['ece']:.3f}", "expected calibration error"),
        ("log loss", f"{scores['log_loss']:.3f}", ""),
        ("test images", str(scores["test_images"]), ""),
    ]


def mistakes(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    wrong = [r for r in rows if r["actual"] != r["predicted"]]
    wrong.sort(key=lambda r: -float(r["confidence"]))
    return [{**r, "file": r["path"].removeprefix(f"{RAW_DIR}/")} for r in wrong[:MISTAKES]]


def data_rows(cfg: Config) -> list[tuple[str, Any]]:
    stats = read_json(DATA_REPORT) if DATA_REPORT.is_file() else {}
    rows: list[tuple[str, Any]] = [("dataset", cfg.dataset_name), ("layout", stats.get("layout", "?"))]
    rows += [(f"{split} images", count) for split, count in stats.get("per_split", {}).items()]
    rows += [
        ("quarantined", stats.get("quarantined", 0)),
        ("exact duplicates dropped", stats.get("duplicates_dropped", 0)),
        ("near-duplicate groups", stats.get("near_duplicate_groups", 0)),
        ("files ignored", stats.get("ignored_files", 0)),
    ]
    return rows


def lineage(cfg: Config) -> list[tuple[str, str]]:
    download = read_json(DOWNLOAD_REPORT) if DOWNLOAD_REPORT.is_file() else {}
    rows = [
        ("data", str(download.get("url", cfg.data.url))),
        ("data sha256", str(download.get("sha256") or "(a folder)")),
    ]
    if os.environ.get("DVC_EXP_NAME"):
        rows.append(("DVC experiment", os.environ["DVC_EXP_NAME"]))
    if MLFLOW_RUN_FILE.is_file():
        run = read_json(MLFLOW_RUN_FILE)
        rows.append(("MLflow run", run["run_id"]))
        rows += [
            (f"registered model ({kind})", f"models:/{m['registered_model']}/{m['version']}")
            for kind, m in run.get("models", {}).items()
            if m.get("registered_model")
        ]
    return rows


def write_report(cfg: Config, path: Path) -> None:
    """``path``: the page, from the files the stages wrote (see the module's docstring)."""
    scores = read_json(METRICS)
    committed = committed_params()
    page = TEMPLATE.render(
        title=f"{cfg.dataset_name}: {cfg.model.backbone} classifier",
        classes=list(scores["per_class"]),
        headline=headline(scores),
        warnings=[w for w in [interval_warning(scores)] if w],
        per_class=list(scores["per_class"].items()),
        mistakes=mistakes(read_csv(PREDICTIONS)),
        pictures=[(heading, data_uri(PLOTS_DIR / name)) for name, heading in PICTURES if (PLOTS_DIR / name).is_file()],
        suspects=read_csv(LABEL_ISSUES_REPORT)[:SUSPECTS],
        data=data_rows(cfg),
        changed=differences(cfg.flat(), committed) if committed is not None else None,
        lineage=lineage(cfg),
    )
    with atomic_file(path) as fh:
        fh.write(page)
