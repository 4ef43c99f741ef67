"""Faults outside the data: storage errors, killed runs' leftovers, file modes, an unreachable
tracking server, secrets in params, parallel first runs sharing a download cache and a new MLflow store."""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import mlflow
import pytest
from test_download import ArchiveServer
from test_pipeline_e2e import free_port

from conftest import REPO, make_images, run, set_params
from pipeline import files
from pipeline.cli import UserError, redact_url
from pipeline.paths import DOWNLOAD_REPORT
from pipeline.report import tracking
from pipeline.stages import download


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
    run([sys.executable, "-m", "pipeline.stages.download"], project)
    before = tree_digest(project / "data" / "raw")
    # New, bigger images: the copy into data/raw fails part-way.
    set_params(project, **{"data.url": str(make_images(tmp_path / "big", {"a": 3, "b": 3}, size=(400, 300)))})
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.download"],
        cwd=project,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert lines[0].startswith("error: file too large for the file system or process limits writing data/.raw.tmp-"), (
        lines
    )
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
        "train.epochs": 3,
    }
    logged = tracking.loggable_params(params)
    assert logged["data.url"] == "https://alice:***@example.com/flowers.tgz?X-Amz-Signature=***&v=***"
    assert logged["train.epochs"] == 3 and logged["data.sha256"] is None
    assert "hunter2" not in str(logged) and "abc123" not in str(logged)


def test_plain_paths_are_logged_as_they_are():
    assert redact_url("/data/flower_photos.tgz") == "/data/flower_photos.tgz"
    assert redact_url("file:///data/flower_photos.tgz") == "file:///data/flower_photos.tgz"
    assert redact_url("https://example.com:8443/flowers.tgz") == "https://example.com:8443/flowers.tgz"


def test_a_user_name_alone_is_masked_as_it_is_often_a_token():
    assert redact_url("https://ghp_abc@example.com/x.tgz") == "https://***@example.com/x.tgz"
    assert redact_url("https://alice:@example.com/x.tgz") == "https://alice:***@example.com/x.tgz"


def test_storage_errors_from_any_stage_become_one_line(capsys, monkeypatch):
    import errno

    from pipeline.cli import run_stage

    monkeypatch.setattr(sys, "argv", ["stage"])  # as DVC runs it: no arguments

    def stage_that_fills_the_disk():
        with open("/dev/full", "w") as fh:  # every write to /dev/full fails with ENOSPC
            fh.write("x" * 10)
            fh.flush()

    with pytest.raises(SystemExit) as exit_info:
        run_stage(stage_that_fills_the_disk)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: no space left on the device: free space or fix permissions and rerun; nothing half-written was left"
    )

    def stage_with_a_bug():
        raise OSError(errno.ENOENT, "a bug, not a storage problem")

    with pytest.raises(FileNotFoundError):
        run_stage(stage_with_a_bug)


def test_models_with_arbitrary_code_are_refused(tmp_path):
    """Keras safe mode: a .keras file carrying a Lambda (pickled Python code) does not load."""
    import keras

    from pipeline.model import networks

    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "lambda.keras")
    with pytest.raises(UserError, match=r"contains Python code .* \(Keras safe mode\)"):
        networks.load(tmp_path / "lambda.keras")


# --- What killed runs leave behind ------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_temporaries_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "data"
    host, dead = files.HOST, dead_pid()
    with subprocess.Popen(["sleep", "60"]) as running:
        stale_dir = out / f".raw.tmp-{host}-{dead}-0a1b2c3d"
        live_dir = out / f".raw.tmp-{host}-{running.pid}-0a1b2c3d"  # a run still writing: left alone
        stale_file = out / f".download.json.tmp-{host}-{dead}-4e5f6a7b"
        other_host = out / f".raw.tmp-elsewhere-{dead}-0a1b2c3d"  # pids of another host mean nothing here
        interrupted_swap = out / f".prepared.old-{host}-{dead}-8c9d0e1f"  # killed between the two renames
        for folder in (stale_dir, live_dir, other_host, interrupted_swap):
            folder.mkdir(parents=True)
            (folder / "image.jpg").write_bytes(b"x" * 1000)
        stale_file.write_text("{")
        with files.atomic_dir(out / "raw") as staging:
            (staging / "new.jpg").write_bytes(b"y")
        running.kill()
    assert sorted(p.name for p in out.iterdir()) == sorted([live_dir.name, other_host.name, "prepared", "raw"])
    assert (out / "prepared" / "image.jpg").is_file()  # the previous folder is back in place


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), [(0o002, 0o775, 0o664), (0o027, 0o750, 0o640)])
def test_outputs_get_the_modes_the_umask_allows(workdir, tmp_path, umask, folder_mode, file_mode):
    source = make_images(tmp_path / "images", {"a": 1, "b": 1})
    set_params(workdir, **{"data.url": str(source)})
    previous = os.umask(umask)
    try:
        download.main()
    finally:
        os.umask(previous)
    raw = workdir / "data" / "raw"
    assert {oct(p.stat().st_mode & 0o777) for p in [raw, raw / "a"]} == {oct(folder_mode)}
    assert {oct(p.stat().st_mode & 0o777) for p in [raw / "a" / "a_000.jpg", workdir / DOWNLOAD_REPORT]} == {
        oct(file_mode)
    }
    assert json.loads((workdir / DOWNLOAD_REPORT).read_text())["files"] == 2


# --- Parallel first runs (dvc queue start -j 2 on a new project) ------------------------------


def parallel(command: list[str], folders: list[Path], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """``command`` run in each of ``folders`` at once; each process prints a line once it has
    imported what it needs, then waits for the file ``go`` beside the folders: they start together."""
    processes = [
        subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for folder in folders
    ]
    for process in processes:
        assert process.stdout is not None
        process.stdout.readline()
    (folders[0].parent / "go").touch()
    outputs = [p.communicate(timeout=300) for p in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(processes, outputs)]


WHEN_GO = (
    "import sys, time; from pathlib import Path\nprint('ready', flush=True)\n"
    "while not Path('../go').exists(): time.sleep(0.001)\n"
)


def test_two_first_downloads_of_one_url_at_once_download_it_once(tmp_path):
    archive = tmp_path / "images.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(make_images(tmp_path / "served", {"a": 3, "b": 3}), arcname="images")
    server = ArchiveServer(archive.read_bytes())
    server.trickle = 2 / (len(server.payload) / 1024)  # the whole body in two seconds
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folders = [tmp_path / "runs" / name for name in ("first", "second")]
    for folder in folders:
        folder.mkdir(parents=True)
        shutil.copy(REPO / "params.yaml", folder)
        set_params(folder, **{"data.url": server.url})
    stage = (
        WHEN_GO + "from pipeline.cli import run_stage; from pipeline.stages import download; run_stage(download.main)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_CACHE_DIR": str(tmp_path / "cache")}
    try:
        results = parallel([sys.executable, "-c", stage], folders, env)
    finally:
        server.shutdown()
        server.server_close()
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert server.ranges == [None]  # one download, from the first byte
    assert sum("download: waiting for another process downloading" in r.stderr for r in results) == 1
    assert tree_digest(folders[0] / "data" / "raw") == tree_digest(folders[1] / "data" / "raw")


def test_two_first_mlflow_runs_at_once_share_one_new_store(tmp_path):
    folders = [tmp_path / "runs" / name for name in ("first", "second")]
    for folder in folders:
        folder.mkdir(parents=True)
    start = WHEN_GO.replace("print(", "import mlflow; from pipeline.report import tracking; print(") + (
        "with tracking.start_new_run('parallel', 'run', system_metrics=False): mlflow.log_metric('x', 1)"
    )
    # DVC_ROOT: the project root, which DVC points queued experiments at: one store, tmp_path/mlflow.db.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))},
        "PYTHONPATH": str(REPO),
        "DVC_ROOT": str(tmp_path),
    }
    results = parallel([sys.executable, "-c", start], folders, env)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-3000:] for r in results]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert [r.data.metrics for r in runs] == [{"x": 1.0}] * 2
