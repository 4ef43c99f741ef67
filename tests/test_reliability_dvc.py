"""Faults where DVC's own behaviour is the cause, through a real `dvc repro` / `dvc exp run`:
DVC deletes a stage's outputs before running it (unless they are `persist`), a stage killed with
SIGKILL, a disk that fills up while DVC itself writes, and `-S` values holding `=` or `,`.

Each runs the cheapest stages (download, prepare) on a tiny project: ~5-10 s per `dvc` call.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_download import ArchiveServer, basic
from test_reliability import tree_digest

from conftest import make_images, new_project, project_env, project_through, run, set_params

pytestmark = pytest.mark.slow


def outputs(project: Path, *paths: str) -> dict[str, str]:
    """A digest of each output: a folder's tree, a file's bytes."""
    return {p: tree_digest(project / p) if (project / p).is_dir() else (project / p).read_text() for p in paths}


@contextlib.contextmanager
def serving(archive: Path, authorization: str) -> Iterator[ArchiveServer]:
    server = ArchiveServer(archive.read_bytes())
    server.authorization = authorization
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_exp_run_with_a_quoted_url_then_a_refused_download_keeps_the_outputs(project, tmp_path):
    archive = tmp_path / "flowers.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(make_images(tmp_path / "served", {"red": 4, "green": 4, "blue": 4}), arcname="flowers")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password hunter2\n")
    env = {**project_env(project), "NETRC": str(netrc)}  # credentials outside params.yaml and dvc.lock
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    with serving(archive, basic("alice", "hunter2")) as server:
        url = f"{server.url}?sig=abc123,def&v=1"  # '=' and ',' need the inner quotes (Hydra's grammar)
        for unquoted, complaint in (
            (f"data.url={url}", "mismatched input '=' expecting <EOF>"),
            (f"data.url={server.url}?sig,v", "Sweep overrides can't be used without `--queue`"),
        ):
            failed = run(["dvc", "exp", "run", "download", "-S", unquoted], project, check=False, env=env)
            assert failed.returncode != 0 and complaint in failed.stderr
        run(["dvc", "exp", "run", "download", "-S", f'data.url="{url}"'], project, env=env)
    assert f"url: {url}\n" in (project / "params.yaml").read_text()
    assert "?sig=***&v=***" in (project / "reports/download.json").read_text()
    assert "abc123" not in (project / "reports/download.json").read_text()
    assert "abc123" in (project / "dvc.lock").read_text()  # DVC records params as given (docs/data.md, Credentials)

    kept = ["data/raw", "reports/download.json", "dvc.lock"]
    before = outputs(project, *kept)
    set_params(project, **{"data.url": str(tmp_path / "nowhere")})
    refused = run(["dvc", "repro", "download"], project, check=False)
    assert refused.returncode != 0
    assert f"error: data.url: {tmp_path / 'nowhere'} does not exist" in refused.stderr.splitlines()
    assert outputs(project, *kept) == before  # persist: DVC did not delete them first

    set_params(project, **{"data.url": url})  # back to what dvc.lock records: nothing to do
    assert "didn't change, skipping" in run(["dvc", "repro", "download"], project).stdout


def stage_and_workers(dvc: subprocess.Popen, stage: str, seconds: float = 120) -> tuple[psutil.Process, list]:
    """The ``python -m pipeline.<stage>`` process under ``dvc`` once its worker pool is up."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert dvc.poll() is None, f"dvc ended before the {stage} workers were seen:\n{dvc.communicate()[0]}"
        with contextlib.suppress(psutil.Error):
            # Python processes only: without $SHELL, DVC runs the stage under `/bin/sh -c`, and
            # dash does not exec its one command, so the shell is there too.
            tree = [
                p
                for p in psutil.Process(dvc.pid).children(recursive=True)
                if p.name().startswith("python") and f"pipeline.stages.{stage}" in " ".join(p.cmdline())
            ]
            pids = {p.pid for p in tree}
            for process in tree:
                if process.ppid() not in pids and process.children():
                    return process, process.children()
        time.sleep(0.01)
    raise AssertionError(f"no {stage} workers appeared in {seconds} s")


def test_killed_prepare_keeps_its_outputs_leaves_no_workers_and_the_rerun_cleans_up(tmp_path):
    # Big enough images that the worker pool runs for a second or so.
    images = make_images(tmp_path / "images", {"red": 40, "green": 40, "blue": 40}, size=(640, 480))
    project = new_project(tmp_path / "project", images)
    run(["dvc", "repro", "prepare"], project)
    kept = ["data/prepared", "reports/data.json", "dvc.lock"]
    before = outputs(project, *kept)

    set_params(project, seed=7)
    dvc = subprocess.Popen(
        ["dvc", "repro", "prepare"],
        cwd=project,
        env=project_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stage, workers = stage_and_workers(dvc, "prepare")
    stage.kill()
    _, alive = psutil.wait_procs(workers, timeout=10)
    for worker in alive:  # left alone they would block forever, holding dvc's output pipe open
        worker.kill()
    assert alive == [], "the workers outlived the stage"
    dvc.communicate(timeout=120)
    assert dvc.returncode != 0
    assert outputs(project, *kept) == before
    assert list((project / "data").glob(".prepared.tmp-*")), "the killed run left no temporary (test too slow?)"

    rerun = run(["dvc", "repro", "prepare"], project)
    assert "Running stage 'prepare'" in rerun.stdout
    assert not list((project / "data").glob(".prepared.tmp-*"))  # removed by the next run
    assert outputs(project, "dvc.lock") != {"dvc.lock": before["dvc.lock"]}


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all of ``disk``'s free space but ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        fh.truncate(0)
        fh.write(bytes(shutil.disk_usage(disk).free - leave))
    return filler


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@needs_root
def test_full_disk_in_a_stage_under_dvc_repro_keeps_everything_and_the_rerun_works(tmp_path):
    images = make_images(tmp_path / "images", {"red": 12, "green": 12, "blue": 12}, size=(400, 300))
    with small_disk(tmp_path / "disk", "64m") as disk:
        project = new_project(disk / "project", images)
        set_params(project, **{"prepare.max_side": 64})
        env = {**project_env(project), "PIPELINE_CACHE_DIR": str(tmp_path / "cache")}
        run(["dvc", "repro", "prepare"], project, env=env)
        kept = ["data/raw", "data/prepared", "reports/data.json", "dvc.lock"]
        before = outputs(project, *kept)

        set_params(project, **{"prepare.max_side": 400})  # bigger images than the 100 KB left
        filler = fill(disk, leave=100_000)
        full = run(["dvc", "repro", "prepare"], project, check=False, env=env)
        assert full.returncode != 0
        [error] = [line for line in full.stderr.splitlines() if line.startswith("error:")]
        assert error.startswith("error: no space left on the device"), error
        assert outputs(project, *kept) == before
        assert not [p.name for p in (project / "data").iterdir() if ".tmp-" in p.name]

        filler.unlink()
        run(["dvc", "repro", "prepare"], project, env=env)
        assert run(["dvc", "status", "prepare"], project, env=env).stdout.strip() == (
            "Data and pipelines are up to date."
        )


@needs_root
def test_disk_full_while_dvc_writes_its_state_recovers_as_docs_errors_says(tmp_path):
    images = make_images(tmp_path / "images", {"red": 12, "green": 12, "blue": 12}, size=(400, 300))
    raw_bytes = sum(p.stat().st_size for p in images.rglob("*.jpg"))
    with small_disk(tmp_path / "disk", "64m") as disk:
        project = new_project(disk / "project", images)
        env = {**project_env(project), "PIPELINE_CACHE_DIR": str(tmp_path / "cache")}
        # Room for data/raw once, not for DVC's copy of it in .dvc/cache: the stage succeeds,
        # then DVC runs out of space caching it and writing dvc.lock, which it rewrites in place.
        filler = fill(disk, leave=raw_bytes * 3 // 2)
        full = run(["dvc", "repro", "prepare"], project, check=False, env=env)
        assert full.returncode != 0 and "No space left on device" in full.stderr
        # Which of DVC's two state files the disk cut depends on how far its writes got: dvc.lock,
        # or .dvc/tmp/rwlock as DVC releases its lock. docs/errors.md's recovery names both.
        filler.unlink()
        cut_files = {"'./dvc.lock' validation failed": "dvc.lock", "Unable to read RWLock-file": ".dvc/tmp/rwlock"}
        removed = []
        while (status := run(["dvc", "status"], project, check=False, env=env)).returncode != 0:
            cut = [name for message, name in cut_files.items() if message in status.stderr and name not in removed]
            assert cut, status.stderr
            (project / cut[0]).unlink()
            removed.append(cut[0])
        assert removed, "the full disk cut neither dvc.lock nor .dvc/tmp/rwlock"

        run(["dvc", "repro", "prepare"], project, env=env)
        assert run(["dvc", "status", "prepare"], project, env=env).stdout.strip() == (
            "Data and pipelines are up to date."
        )


def test_a_killed_stage_restored_from_the_run_cache_leaves_no_temporary_after_make_run(tmp_path):
    """DVC restores a stage's outputs from its run cache without running it: no stage of ours writes
    into data/ then, yet `make run`'s last step (the summary tool) still sweeps the killed one's folder."""
    project = project_through("augment", tmp_path, {"red": 12, "green": 12, "blue": 12}, {})
    set_params(project, **{"augment.copies": 2})
    dvc = subprocess.Popen(
        ["dvc", "repro", "augment"],
        cwd=project,
        env=project_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stage, _ = stage_and_workers(dvc, "augment")
    while not list((project / "data").glob(".augmented.tmp-*")):
        assert dvc.poll() is None, "augment ended before its temporary folder was seen"
        time.sleep(0.01)
    stage.kill()
    dvc.communicate(timeout=120)
    set_params(project, **{"augment.copies": 1})  # back to what ran before: DVC's run cache has its outputs
    assert "Stage 'augment' is cached - skipping run" in run(["dvc", "repro", "augment"], project).stdout
    assert list((project / "data").glob(".augmented.tmp-*"))
    run([sys.executable, "-m", "pipeline.tools.summary"], project, check=False)  # no metrics yet: one line, exit 2
    assert not list((project / "data").glob(".augmented.tmp-*"))
