"""Warm workers (pipeline/warm.py, `make warm`): a stage handed to a process that has imported
TensorFlow already behaves as the stage's own process would — output, exit status, signals, the
code as it is now — and runs only where the worker's environment is the stage's. That it trains
the same model is tests/test_one_model.py's."""

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO, make_images, new_project, project_env, run, set_params
from pipeline.warm import LOG, SOCKET, WARM_STAGES

pytestmark = pytest.mark.e2e  # real workers, real stages: out of make test-fast
# Small and quick, with a fine-tuning phase (checkpointed each epoch) to interrupt in the middle.
SETTINGS = {
    "model.backbone": "resnet50",
    "model.image_size": 32,
    "train.fine_tune.blocks": 1,
    "train.fine_tune.epochs": 2,
    "train.early_stopping_patience": None,
    "export.tflite": [],
}


@contextlib.contextmanager
def warm_workers(project: Path, env: dict[str, str] | None = None, idle_minutes: float = 5) -> Iterator[None]:
    """A warm worker waiting for the project's stages (`make warm`), and none left afterwards."""
    command = [sys.executable, "-m", "pipeline.warm"]
    run([*command, "start", "--idle-minutes", str(idle_minutes)], project, env=env)
    try:
        yield
    finally:
        run([*command, "stop"], project, env=env)
        _, alive = psutil.wait_procs(workers(project), timeout=30)  # the last stage's worker exits after it reports
        for worker in alive:  # one still running a stage: a test failed in the middle
            worker.kill()
        psutil.wait_procs(alive, timeout=30)


def workers(project: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if process.info["cwd"] == str(project) and "pipeline.warm" in (process.info["cmdline"] or []):
            found.append(process)
    return found


def gone(process: psutil.Process) -> bool:
    return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


def spare(project: Path) -> psutil.Process:
    """The spare beside the worker `make warm` started (the one worker started as a spare so far)."""
    [found] = [process for process in workers(project) if "--spare-fd" in process.info["cmdline"]]
    return found


def ran_warm(project: Path) -> list[str]:
    """The stages the project's workers ran, in order, with their exit status: ``train 0``."""
    log = (project / LOG).read_text() if (project / LOG).is_file() else ""
    return [f"{m[1]} {m[2]}" for m in re.finditer(r"pipeline\.stages\.(\w+) exited (-?\d+) after", log)]


def wait_for(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project through label_issues: train, evaluate and export are left to run."""
    root = tmp_path_factory.mktemp("warm")
    project = new_project(root / "project", make_images(root / "images", {"red": 12, "green": 12, "blue": 12}))
    set_params(project, **SETTINGS)
    run(["dvc", "repro", "label_issues"], project)
    return project


def test_the_warm_stages_are_the_stages_that_import_tensorflow():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    importing = []
    for stage in stages:
        check = f"import sys, pipeline.stages.{stage}; print('tensorflow' in sys.modules)"
        if run([sys.executable, "-c", check], REPO).stdout.strip() == "True":
            importing.append(stage)
    assert tuple(importing) == WARM_STAGES


def test_a_stage_in_a_warm_worker_answers_as_in_its_own_process(project):
    # A user mistake: export before any model. Same line, same exit status, warm or not.
    cold = run([sys.executable, "-m", "pipeline.stages.export"], project, check=False)
    with warm_workers(project):
        warm = run([sys.executable, "-m", "pipeline.stages.export"], project, check=False)
        assert ran_warm(project) == ["export 2"]
    assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert cold.returncode == 2 and cold.stderr.startswith("error: ") and cold.stderr.count("\n") == 1

    # A stage that works prints its summary where the stage process would.
    with warm_workers(project):
        trained = run([sys.executable, "-m", "pipeline.stages.train"], project)
        assert ran_warm(project)[-1] == "train 0"
    assert trained.stdout.startswith("train: ") and "data/model" in trained.stdout


def test_ctrl_c_reaches_the_stage_and_a_killed_stage_process_takes_its_stage_along(project):
    params = (project / "params.yaml").read_text()
    set_params(project, **{"train.fine_tune.epochs": 60})  # long enough to be stopped in the middle
    try:
        with warm_workers(project):
            # Ctrl-C (SIGINT) in the middle of fine-tuning: the stage process passes it on, and the
            # stage ends as in its own process, with "interrupted" and exit status 130.
            stage = subprocess.Popen(
                [sys.executable, "-m", "pipeline.stages.train"],
                cwd=project,
                env=project_env(project),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            state = project / "data" / "checkpoints" / "fine_tune" / "state.json"
            wait_for(lambda: state.is_file() or stage.poll() is not None, "the first fine-tuning checkpoint", 600)
            stage.send_signal(signal.SIGINT)
            output = stage.communicate(timeout=120)[0]
            assert stage.returncode == 130 and "interrupted" in output, output
            assert ran_warm(project) == ["train 130"]

            # SIGKILL cannot be passed on: the worker sees its stage process gone, and ends too.
            stage = subprocess.Popen(
                [sys.executable, "-m", "pipeline.stages.train"], cwd=project, env=project_env(project)
            )
            wait_for(
                lambda: len(re.findall("runs pipeline.stages.train", (project / LOG).read_text())) == 2, "the next"
            )
            [_, pid] = re.findall(r"worker (\d+): runs pipeline\.stages\.train", (project / LOG).read_text())
            worker = psutil.Process(int(pid))
            stage.kill()
            stage.wait()
            wait_for(lambda: gone(worker), "its end")
            assert ran_warm(project) == ["train 130"]
            assert (project / SOCKET).exists()  # the successor waits for the next stage
    finally:
        (project / "params.yaml").write_text(params)
        shutil.rmtree(project / "data" / "checkpoints", ignore_errors=True)
    assert not (project / SOCKET).exists() and workers(project) == []


def test_a_stage_from_another_environment_runs_in_its_own_process_and_the_next_is_warm(project):
    other = {**project_env(project), "TF_ENABLE_ONEDNN_OPTS": "0"}  # read when TensorFlow loads
    with warm_workers(project):
        spare_with_our_environment = spare(project)
        run([sys.executable, "-m", "pipeline.stages.train"], project, env=other)
        assert ran_warm(project) == []
        assert (
            "refused pipeline.stages.train: environment variables differ: TF_ENABLE_ONEDNN_OPTS"
            in (project / LOG).read_text()
        )
        wait_for(lambda: gone(spare_with_our_environment), "the spare with the other environment to exit", 60)
        run([sys.executable, "-m", "pipeline.stages.train"], project, env=other)  # the successor has its env
        assert ran_warm(project) == ["train 0"]


def test_the_stage_runs_the_code_as_edited_after_its_worker_started(project):
    # The worker imported only pipeline/__init__.py and pipeline/warm.py; the stage imports the
    # package afresh, so an edit shows: here once in the stage process, once in the worker for the stage.
    package = project / "pipeline" / "__init__.py"
    original = package.read_text()
    with warm_workers(project):
        try:
            package.write_text(original + '\nimport sys\n\nprint("pipeline as edited", file=sys.stderr)\n')
            edited = run([sys.executable, "-m", "pipeline.stages.export"], project, check=False)
        finally:
            package.write_text(original)
        assert [line.split()[0] for line in ran_warm(project)] == ["export"]
    assert edited.stderr.count("pipeline as edited\n") == 2


def test_a_worker_exits_when_stopped_or_idle(project):
    env = project_env(project)
    start = run([sys.executable, "-m", "pipeline.warm", "start", "--idle-minutes", "0.05"], project, env=env)
    assert re.match(r"warm worker \d+ ready in [\d.]+ s", start.stdout)
    wait_for(lambda: not (project / SOCKET).exists() and not workers(project), "the idle worker to exit", 30)
    assert "idle for 0.05 min: exiting" in (project / LOG).read_text()

    run([sys.executable, "-m", "pipeline.warm", "start"], project, env=env)
    assert (project / SOCKET).exists() and len(workers(project)) == 2  # the worker waiting and its spare
    assert run([sys.executable, "-m", "pipeline.warm", "stop"], project, env=env).stdout.startswith("stopped")
    wait_for(lambda: not (project / SOCKET).exists() and not workers(project), "the worker and its spare to exit", 60)
    stopped = run([sys.executable, "-m", "pipeline.warm", "stop"], project, env=env)
    assert stopped.stdout == "no warm worker was waiting\n"


def test_a_spare_that_dies_before_it_takes_the_socket_is_replaced(project):
    with warm_workers(project):
        dying = spare(project)
        dying.suspend()  # held in its imports: it cannot take the socket before it is killed
        stage = subprocess.Popen(
            [sys.executable, "-m", "pipeline.stages.export"], cwd=project, env=project_env(project)
        )
        wait_for(lambda: "runs pipeline.stages.export" in (project / LOG).read_text(), "the worker to take the stage")
        dying.kill()
        stage.wait(timeout=300)
        wait_for(lambda: "the spare ended before it took the socket" in (project / LOG).read_text(), "the stand-in")
        run([sys.executable, "-m", "pipeline.stages.export"], project, check=False)  # warm again
        assert [line.split()[0] for line in ran_warm(project)] == ["export", "export"]


def test_a_socket_left_by_a_killed_worker_is_run_past_then_replaced(project, monkeypatch):
    monkeypatch.chdir(project)  # SOCKET is relative to the project (a Unix socket's path is short)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(SOCKET))  # bound, never listening: what a SIGKILLed worker leaves
    stale.close()
    cold = run([sys.executable, "-m", "pipeline.stages.export"], project, check=False)
    assert cold.stderr.startswith("error: ") or cold.returncode == 0, cold.stderr
    assert ran_warm(project) == []
    with warm_workers(project):
        run([sys.executable, "-m", "pipeline.stages.export"], project, check=False)
        assert [line.split()[0] for line in ran_warm(project)] == ["export"]


@pytest.fixture(autouse=True)
def fresh_log(project):
    """Each test reads only its own workers' lines."""
    (project / LOG).unlink(missing_ok=True)
    yield
    assert not workers(project), "a warm worker outlived its test"
