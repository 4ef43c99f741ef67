"""Shared fixtures: generated image folders and throw-away copies of the project to run DVC in."""

import base64
import colorsys
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from pipeline.config import override_params

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["pipeline", "params.yaml", "dvc.yaml", ".dvcignore", ".dvc/config"]
# The smallest real backbone (MobileNet 0.25 at 32 px: 0.2 M weights, 1 MB files, against Inception
# v3's 22 M and 90 MB at new_project's 75 px), for tests about the pipeline around the model.
SMALL_BACKBONE = {"model.backbone": "mobilenet", "model.alpha": 0.25, "model.image_size": 32}


def make_images(root: Path, per_class: dict[str, int], size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """Write ``per_class`` JPEGs per class: each class a distinct hue, each image distinct noise."""
    rng = np.random.default_rng(seed)
    for index, (label, count) in enumerate(per_class.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        base = 255 * np.array(colorsys.hsv_to_rgb(index / len(per_class), 0.8, 0.8))
        for i in range(count):
            noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
            pixels = np.clip(base + noise, 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / label / f"{label}_{i:03d}.jpg", quality=95)
    return root


def run(args: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env or project_env(cwd))
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def project_env(cwd: Path) -> dict[str, str]:
    """The environment a user has after `make setup`: the venv first on PATH, default MLflow store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PIPELINE_CACHE_DIR"] = str(cwd / ".cache-test")
    return env


def set_params(project: Path, **dotted) -> None:
    """set_params(p, **{"model.weights": "none"}): edit params.yaml like `dvc exp run -S` does."""
    override_params(project / "params.yaml", dotted)


def stages_run(dvc_output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", dvc_output)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_cpus(stage: str) -> list[str]:
    """The command running ``python -m pipeline.<stage>`` with the CPU split into two logical
    devices: pipeline.model.devices then mirrors over them, as it would over two GPUs."""
    script = ("import tensorflow as tf\n"
              "cpu = tf.config.list_physical_devices('CPU')[0]\n"
              "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
              "from pipeline.cli import run_stage\n"
              f"from pipeline.stages.{stage} import main\n"
              "run_stage(main)\n")
    return [sys.executable, "-c", script]


def make_serve_command(port: int, model_uri: str | None) -> str:
    """The command ``make serve SERVE_PORT=<port> [MODEL=<model_uri>]`` runs: ``make -n`` prints it
    (and the setup it would redo) without running anything."""
    model = [f"MODEL={model_uri}"] if model_uri else []
    printed = subprocess.run(["make", "-n", "-s", "serve", f"SERVE_PORT={port}", *model], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    return next(line for line in printed.splitlines() if line.startswith("mlflow models serve "))


@contextlib.contextmanager
def model_server(project: Path, model_uri: str | None = None) -> Iterator[str]:
    """What ``make serve`` runs in ``project`` (``model_uri``, or by default the registered
    model's ``@champion``), on the project's store; yields the server's base URL once it answers."""
    port = free_port()
    env = {**project_env(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    server = subprocess.Popen(
        ["bash", "-c", f"exec {make_serve_command(port, model_uri)}"],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.time() < deadline, f"mlflow models serve did not answer on port {port} within 180 s"
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def input_split(dataset_input) -> str:
    """The split (train, val, test) a run's dataset input was logged for: its context tag."""
    return next(t.value for t in dataset_input.tags if t.key == "mlflow.data.context")


def image_request(images: list[bytes], **params) -> dict:
    """The JSON body of an /invocations request for the image_classifier model (README, Serving)."""
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(i).decode()] for i in images]}}
    return {**body, "params": params} if params else body


def new_project(root: Path, images: Path) -> Path:
    """A fresh git + DVC project at ``root`` holding this repo's pipeline, set up for tiny, fast
    runs on the class folders in ``images``."""
    for name in PROJECT_FILES:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    set_params(root, **{
        "data.url": str(images),
        "model.weights": "none",
        "model.image_size": 75,
        "augment.copies": 1,
        "train.epochs": 3,
        "train.batch_size": 8,
    })
    return root


def project_through(stage: str, root: Path, per_class: dict[str, int], params: dict) -> Path:
    """A new project in ``root`` on generated images (``per_class``), with ``params`` set and
    ``dvc repro <stage>`` done: the start of a module's tests of a later stage."""
    project = new_project(root / "project", make_images(root / "images", per_class))
    set_params(project, **params)
    run(["dvc", "repro", stage], project)
    return project


@pytest.fixture(scope="session", autouse=True)
def temp_dir_inside_pytests(tmp_path_factory) -> Iterator[None]:
    """The temp dir of the tests and of every process they start (MLflow's serving and model loads
    leave folders there) inside pytest's base temp, which goes with a passing session."""
    scratch = str(tmp_path_factory.mktemp("tmp", numbered=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", scratch)
        patch.setattr(tempfile, "tempdir", scratch)
        yield


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh project (see new_project) on 3 classes x 12 generated images."""
    return new_project(tmp_path / "project", make_images(tmp_path / "images", {"red": 12, "green": 12, "blue": 12}))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """An empty project folder as the current directory, with this repo's params.yaml and its own cache."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    return root
