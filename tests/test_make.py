"""The Makefile's user variables reach the commands as typed, never as make or shell code: ``make
run SET=...``, ``make predict PATHS=...`` (tests/test_predict.py, with a model), ``make serve
MODEL=...``, ``make exp EXP_GRID=...``. ``dvc`` and ``mlflow`` are stand-ins on PATH that record
the arguments they get: what is tested is what make hands them."""

import json
import os
from pathlib import Path

import pytest

from conftest import make, new_project, project_env, run

HOSTILE = {"backticks": "`touch {marker}`", "dollar": "$(touch {marker})", "semicolon": "1; touch {marker}"}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project whose `dvc` and `mlflow` add their arguments to <tool>.json and do nothing else."""
    project = new_project(tmp_path / "project", tmp_path / "images")
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    for tool in ("dvc", "mlflow"):
        script = stand_ins / tool
        script.write_text(
            f"#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]), file=open('{tool}.json', 'a'))\n"
        )
        script.chmod(0o755)
    return project


def make_in(project: Path, target: str, **variables: str):
    env = project_env(project)
    env["PATH"] = f"{project.parent / 'bin'}{os.pathsep}{env['PATH']}"
    return run(make(target, **variables), project, check=False, env=env)


def arguments(project: Path, tool: str) -> list[str] | None:
    """The arguments of the first call of ``tool``, if any."""
    path = project / f"{tool}.json"
    return json.loads(path.read_text().splitlines()[0]) if path.exists() else None


@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE.keys())
def test_set_runs_nothing_it_holds_and_refuses_what_is_not_key_value(project, hostile):
    marker = project / "ran"
    result = make_in(project, "run", SET=f"train.epochs=2 {hostile.format(marker=marker)}")
    assert result.returncode != 0 and not marker.exists()
    assert result.stderr.splitlines()[0].startswith("error: SET: '") and "is not key=value" in result.stderr
    assert arguments(project, "dvc") is None  # refused before DVC ran


def test_set_values_are_split_like_a_shell_line_and_kept_literally(project):
    result = make_in(project, "run", SET="train.epochs=2 data.url='/data/my photos' model.weights='$(none)'")
    assert arguments(project, "dvc") == [
        "exp",
        "run",
        "-S",
        "train.epochs=2",
        "-S",
        "data.url=/data/my photos",
        "-S",
        "model.weights=$(none)",
    ], result.stderr
    assert result.stdout.startswith("dvc exp run -S train.epochs=2 -S 'data.url=/data/my photos'")


def test_unbalanced_quotes_in_set_are_one_line(project):
    result = make_in(project, "run", SET="data.url='/data/my photos")
    assert result.stderr.splitlines()[0] == (
        "error: SET: No closing quotation: quote values with spaces as in a shell line, e.g. make run "
        "SET=\"train.epochs=5 data.url='/data/my photos'\""
    )


def test_serve_model_and_port_are_text(project):
    marker = project / "ran"
    make_in(project, "serve", MODEL=f'x"; touch {marker}; "', SERVE_PORT="5001")
    assert arguments(project, "mlflow") == [
        "models",
        "serve",
        "-m",
        f'x"; touch {marker}; "',
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        "5001",
    ]
    refused = make_in(project, "serve", SERVE_PORT=f"5001; touch {marker}")
    assert refused.stderr.splitlines()[0] == f"error: SERVE_PORT: '5001; touch {marker}' is not a port number (1-65535)"
    assert not marker.exists()


def test_exp_grid_is_split_without_a_shell(project):
    marker = project / "ran"
    result = make_in(project, "exp", EXP_GRID=f"-S 'train.epochs=1,2' `touch {marker}`")
    # The grid reaches pipeline.tools.experiments as typed, which splits it like DVC's sweeps and refuses
    # what is not -S key=value in one line, before DVC runs.
    assert result.returncode != 0 and not marker.exists()
    assert any(
        line.startswith("error: EXP_GRID: expected '-S key=value1,value2' pairs") for line in result.stderr.splitlines()
    )
    assert arguments(project, "dvc") is None
