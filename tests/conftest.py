"""Shared fixtures: generated image folders and throw-away copies of the project to run DVC in."""

import base64
import colorsys
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.config import override_params

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # real weights and data, in a folder beside the clone (docs/development.md)
PROJECT_FILES = [
    "pipeline",
    "params.yaml",
    "dvc.yaml",
    ".dvcignore",
    ".dvc/config",
    "Makefile",
    "requirements.lock",
    "pyproject.toml",
]
# The smallest real backbone (MobileNet 0.25 at 32 px: 0.2 M weights, 1 MB files, against Inception
# v3's 22 M and 90 MB at new_project's 75 px), for tests about the pipeline around the model.
SMALL_BACKBONE = {"model.backbone": "mobilenet", "model.alpha": 0.25, "model.image_size": 32}


def require_shared(path: Path) -> None:
    """Skip the calling test when ``path`` (under SHARED) is missing, except in CI (``CI=true``, as CI
    services set it), where a missing file fails it: CI must not lose its real-data tests without a word."""
    if path.exists():
        return
    reason = f"no {path.relative_to(SHARED.parent)} beside the clone (real weights and data)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}, which CI=true requires", pytrace=False)
    pytest.skip(reason)


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


def make_digits(root: Path, per_class: int, seed: int = 0) -> Path:
    """``per_class`` handwritten-looking digits per class in ``root/<0..9>/``, 28x28 grey PNGs, white
    on black, size-normalized and centred like MNIST's: low-detail images whose perceptual hashes
    are close for many images that are not copies of one another."""
    rng = np.random.default_rng(seed)
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            digit(label, rng).save(root / str(label) / f"{i:05d}.png")
    return root


def digit(label: int, rng: np.random.Generator) -> Image.Image:
    """One digit: Pillow's default font at a random size and stroke, turned, sheared and shifted."""
    side = 112  # drawn at 4x, then reduced: anti-aliased edges, as in MNIST
    canvas = Image.new("L", (side, side), 0)
    font = ImageFont.load_default(size=int(rng.integers(52, 80)))
    ImageDraw.Draw(canvas).text(
        (side / 2 + rng.normal(0, 4), side / 2 + rng.normal(0, 4)),
        str(label),
        fill=255,
        font=font,
        anchor="mm",
        stroke_width=int(rng.integers(0, 6)),
        stroke_fill=255,
    )
    canvas = canvas.rotate(rng.normal(0, 12), resample=Image.Resampling.BILINEAR)
    shear = rng.normal(0, 0.2)
    canvas = canvas.transform(
        canvas.size,
        Image.Transform.AFFINE,
        (1, shear, -side / 2 * shear, 0, 1 + rng.normal(0, 0.08), 0),
        Image.Resampling.BILINEAR,
    )
    glyph = ImageOps.contain(canvas.crop(canvas.getbbox() or (0, 0, side, side)), (80, 80))
    out = Image.new("L", (side, side), 0)
    out.paste(
        glyph,
        ((side - glyph.width) // 2 + int(rng.integers(-6, 7)), (side - glyph.height) // 2 + int(rng.integers(-6, 7))),
    )
    return out.resize((28, 28), Image.Resampling.LANCZOS)


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


def start_two_workers(stage: str, chief: Path, worker: Path) -> list[subprocess.Popen]:
    """``python -m pipeline.stages.<stage>`` as worker 0 (the chief) in ``chief`` and as worker 1 in
    ``worker``, like two machines of a cluster on 127.0.0.1, each with its TF_CONFIG and in a
    session of its own (os.killpg ends one); stdout and stderr piped."""
    ports: set[int] = set()
    while len(ports) < 2:
        ports.add(free_port())
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = []
    for index, project in enumerate((chief, worker)):
        env = {
            **project_env(project),
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", f"pipeline.stages.{stage}"],
                cwd=project,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    return processes


def finished(processes: list[subprocess.Popen], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Each process's exit status and output, once all have ended (any left after ``timeout`` are killed)."""
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            process.kill()
    return [
        subprocess.CompletedProcess(process.args, process.returncode, out, err)
        for process, (out, err) in zip(processes, outputs, strict=True)
    ]


def on_two_cpus(stage: str) -> list[str]:
    """The command running ``python -m pipeline.<stage>`` with the CPU split into two logical
    devices: pipeline.model.devices then mirrors over them, as it would over two GPUs."""
    script = (
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from pipeline.cli import run_stage\n"
        f"from pipeline.stages.{stage} import main\n"
        "run_stage(main)\n"
    )
    return [sys.executable, "-c", script]


def make(target: str, **variables: str) -> list[str]:
    """The command ``make <target> NAME=value...`` in a project (new_project copies the Makefile),
    without its ``setup`` prerequisite (which would rebuild .venv): the venv on PATH stands in."""
    return ["make", "-s", "-o", "setup", target, *(f"{name}={value}" for name, value in variables.items())]


def wait_until_up(url: str, process: subprocess.Popen, log: Callable[[], str], seconds: int = 180) -> None:
    """Returns once ``url`` answers; fails when ``process`` (the server) exits first, with what ``log``
    reads of its output (called only then: reading a live process's pipe would block)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, f"the server of {url} exited: {log()}"
        with contextlib.suppress(requests.RequestException):  # not listening yet, or still starting
            if requests.get(url, timeout=2).ok:
                return
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def start_mlflow_server(store: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:``port``, its runs and log (``server.log``) in ``store``, in
    a process group of its own (``os.killpg`` stops its workers too); returned once it answers."""
    log = store / "server.log"
    with log.open("w") as out:  # a file, not a pipe nobody reads, which would fill and stop the server
        server = subprocess.Popen(
            [
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{store / 'server.db'}",
                "--artifacts-destination",
                str(store / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_until_up(f"http://127.0.0.1:{port}/health", server, log.read_text)
    return server


@contextlib.contextmanager
def model_server(project: Path, model_uri: str | None = None) -> Iterator[str]:
    """``make serve`` in ``project`` (``model_uri``, or by default the registered model's
    ``@champion``), on the project's store; yields the server's base URL once it answers."""
    port = free_port()
    env = {**project_env(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    model = {"MODEL": model_uri} if model_uri else {}
    server = subprocess.Popen(
        make("serve", SERVE_PORT=str(port), **model),
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # make, the server and its workers: one process group
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, server.stderr.read)  # type: ignore[union-attr]  # a pipe
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def input_split(dataset_input) -> str:
    """The split (train, val, test) a run's dataset input was logged for: its context tag."""
    return next(t.value for t in dataset_input.tags if t.key == "mlflow.data.context")


def image_request(images: list[bytes], **params) -> dict:
    """The JSON body of an /invocations request for the image_classifier model (docs/mlflow.md, Serving)."""
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
    set_params(
        root,
        **{
            "data.url": str(images),
            "model.weights": "none",
            "model.image_size": 75,
            "augment.copies": 1,
            "train.epochs": 3,
            "train.batch_size": 8,
        },
    )
    return root


def project_through(stage: str, root: Path, per_class: dict[str, int], params: dict) -> Path:
    """A new project in ``root`` on generated images (``per_class``), with ``params`` set and
    ``dvc repro <stage>`` done: the start of a module's tests of a later stage."""
    project = new_project(root / "project", make_images(root / "images", per_class))
    set_params(project, **params)
    run(["dvc", "repro", stage], project)
    return project


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files with the most slow or e2e tests first (a file's tests keep their order): under
    `make test` (pytest-xdist, a file per process at a time) the longest files then start at once,
    instead of one of them running alone at the end."""
    heavy = Counter(item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("e2e"))
    items.sort(key=lambda item: -heavy[item.path])


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
