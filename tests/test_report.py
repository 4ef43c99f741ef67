"""eval/report.html as a reviewer opens it: one file, offline, in a real browser (headless Chromium)."""

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from test_experiments import CHROMIUM_FLAGS

from conftest import SMALL_BACKBONE, project_through

pytestmark = pytest.mark.e2e  # whole pipelines: out of make test-fast


def chromium(*args: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Debian's chromium is needed for this test (make test installs it)"
    return subprocess.run([browser, *CHROMIUM_FLAGS, *args], capture_output=True, text=True, timeout=180)


def test_report_opens_offline_with_the_runs_figures_and_files(tmp_path):
    project = project_through("evaluate", tmp_path, {"cat": 10, "dog": 10, "猫": 10}, SMALL_BACKBONE)
    page = project / "eval" / "report.html"
    html = page.read_text(encoding="utf-8")
    # Offline: nothing is fetched from anywhere; every picture is inside the page.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert html.count('src="data:image/png;base64,') >= 5

    shot = tmp_path / "report.png"
    chromium(
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()
    )
    image = Image.open(shot)
    assert image.size == (1200, 2400) and len(set(image.convert("L").getdata())) > 50  # drawn, not a blank page

    text = " ".join(
        re.sub(
            r"<[^>]+>", " ", chromium(f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", page.as_uri()).stdout
        ).split()
    )
    scores = json.loads((project / "eval" / "metrics.json").read_text())
    assert f"accuracy {scores['accuracy']:.3f}" in text
    assert "猫" in text and "Per class" in text and "Lineage" in text
    with open(project / "eval" / "predictions.csv", newline="", encoding="utf-8") as fh:
        wrong = [r for r in csv.DictReader(fh) if r["actual"] != r["predicted"]]
    for row in wrong[:12]:  # the mistakes are named by the user's own files
        assert (project / row["path"]).is_file() and row["path"].removeprefix("data/raw/") in text
    recorded = json.loads((project / "data" / "model" / "mlflow_run.json").read_text())
    assert recorded["run_id"] in text
    assert Path(project / "eval" / "report.html").stat().st_size < 5_000_000
