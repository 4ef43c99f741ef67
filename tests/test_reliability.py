"""Faults outside the data: storage errors, an unreachable tracking server, secrets in params."""

import hashlib
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_images, run, set_params
from pipeline import tracking
from pipeline.cli import UserError
from test_pipeline_e2e import free_port


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def limit_file_size() -> None:
    """Run in the child: files may not grow past 64 KiB, like a disk that fills up."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_write_failure_is_one_line_and_keeps_previous_outputs(project, tmp_path):
    run([sys.executable, "-m", "pipeline.download"], project)
    before = tree_digest(project / "data" / "raw")
    # New, bigger images: the copy into data/raw fails part-way.
    set_params(project, **{"data.url": str(make_images(tmp_path / "big", {"a": 3, "b": 3}, size=(400, 300)))})
    result = subprocess.run([sys.executable, "-m", "pipeline.download"], cwd=project, capture_output=True,
                            text=True, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "file too large" in lines[0].lower()
    assert tree_digest(project / "data" / "raw") == before
    assert not [p for p in (project / "data").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_unreachable_tracking_server_is_reported_before_training(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:s3cret@127.0.0.1:{free_port()}")
    with pytest.raises(UserError) as err:
        tracking.check_reachable()
    message = str(err.value)
    assert message.startswith("MLflow tracking server http://user:***@127.0.0.1:")
    assert "does not answer (ConnectionError)" in message and "s3cret" not in message


def test_local_store_needs_no_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.check_reachable()  # a SQLite file: nothing to reach, must not raise


def test_secrets_are_masked_before_logging():
    params = {
        "data.url": "https://alice:hunter2@example.com/flowers.tgz?X-Amz-Signature=abc123&v=1",
        "data.sha256": None,
        "mlflow.api_token": "tok-123",
        "train.epochs": 3,
    }
    logged = tracking.loggable_params(params)
    assert logged["data.url"] == "https://alice:***@example.com/flowers.tgz?X-Amz-Signature=***&v=***"
    assert logged["mlflow.api_token"] == "***"
    assert logged["train.epochs"] == 3 and logged["data.sha256"] is None
    assert "hunter2" not in str(logged) and "abc123" not in str(logged)


def test_plain_paths_are_logged_as_they_are():
    assert tracking.redact_url("/data/flower_photos.tgz") == "/data/flower_photos.tgz"
    assert tracking.redact_url("file:///data/flower_photos.tgz") == "file:///data/flower_photos.tgz"


def test_storage_errors_from_any_stage_become_one_line(capsys):
    import errno

    from pipeline.cli import run_stage

    def stage_that_fills_the_disk():
        with open("/dev/full", "w") as fh:  # every write to /dev/full fails with ENOSPC
            fh.write("x" * 10)
            fh.flush()

    with pytest.raises(SystemExit) as exit_info:
        run_stage(stage_that_fills_the_disk)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: no space left on the device: free space or fix permissions and rerun; "
        "outputs of earlier runs are untouched")

    def stage_with_a_bug():
        raise OSError(errno.ENOENT, "a bug, not a storage problem")

    with pytest.raises(FileNotFoundError):
        run_stage(stage_with_a_bug)


def test_models_with_arbitrary_code_are_refused(tmp_path):
    """Keras safe mode: a .keras file carrying a Lambda (pickled Python code) does not load."""
    import keras

    from pipeline import models

    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    with pytest.raises(UserError, match=r"contains Python code .* \(Keras safe mode\)"):
        models.load(tmp_path / "lambda.keras")
