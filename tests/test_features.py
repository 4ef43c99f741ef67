"""The features stage on every device: one CPU, two logical CPUs (MirroredStrategy, as on a machine
with two GPUs) and two worker processes under TF_CONFIG on 127.0.0.1 (MultiWorkerMirroredStrategy)
write the same files. A MobileNet at width 0.25 and 32 px, random weights, keeps it quick."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import finished, on_two_cpus, project_through, run, set_params, start_two_workers

pytestmark = pytest.mark.slow

PER_REPLICA = 4
TINY = {
    "model.backbone": "mobilenet",
    "model.alpha": 0.25,
    "model.image_size": 32,
    "augment.mode": "offline",
    "train.fine_tune.blocks": 1,
    "train.batch_size": PER_REPLICA,
}


@pytest.fixture(scope="module")
def augmented(tmp_path_factory) -> Path:
    """A project with the stages up to augment done, built once per module."""
    return project_through("augment", tmp_path_factory.mktemp("features"), {"red": 9, "green": 9, "blue": 9}, TINY)


@pytest.fixture(scope="module")
def one_process(augmented, tmp_path_factory) -> Path:
    """A copy of ``augmented`` with the features stage done by one process on one CPU."""
    one = copy_of(augmented, tmp_path_factory.mktemp("one"), "one")
    assert "1 replica(s) on 1 worker(s)" in run([sys.executable, "-m", "pipeline.stages.features"], one).stdout
    return one


def copy_of(project: Path, root: Path, name: str) -> Path:
    return Path(shutil.copytree(project, root / name, symlinks=True))


def outputs(project: Path) -> dict[str, np.ndarray]:
    return {path.name: np.load(path) for path in sorted((project / "data" / "features").glob("*.npy"))}


def meta_but_time(project: Path) -> dict:
    return json.loads((project / "data" / "features" / "meta.json").read_text()) | {"seconds": None}


def two_workers(chief: Path, worker: Path) -> list[str]:
    """The features stage on a cluster of two workers (conftest.start_two_workers); their output."""
    results = finished(start_two_workers("features", chief, worker), timeout=300)
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
    return [result.stdout for result in results]


def test_every_device_count_and_worker_count_writes_the_same_features(augmented, one_process, tmp_path):
    mirrored, chief, worker = (copy_of(augmented, tmp_path, name) for name in ("mirrored", "chief", "worker"))
    assert "2 replica(s) on 1 worker(s)" in run(on_two_cpus("features"), mirrored).stdout
    assert all("2 replica(s) on 2 worker(s)" in log for log in two_workers(chief, worker))
    assert not (worker / "data" / "features").exists()  # only the chief writes

    expected = outputs(one_process)
    assert {"train_activations.npy", "val_activations.npy", "test.npy"} <= set(expected)
    features = expected["train.npy"]
    assert len(np.unique(features, axis=0)) == len(features)  # distinct rows: a shuffled or repeated one shows
    # The last global batch (8 rows on two replicas) is short in some split: padding is exercised.
    assert any(len(rows) % (2 * PER_REPLICA) for rows in expected.values())
    for project in (mirrored, chief):
        got = outputs(project)
        assert set(got) == set(expected)
        for name, rows in expected.items():
            np.testing.assert_array_equal(got[name], rows, err_msg=f"{project.name}: {name}")
        assert meta_but_time(project) == meta_but_time(one_process)


def kill_once_extracting(process: subprocess.Popen, chief: Path, timeout: float = 300) -> None:
    """SIGKILL ``process`` (a worker, in a session of its own) once the chief has opened the features
    file of the first split in its temporary output folder (files.atomic_dir): the backbone has
    every batch of every split still to run, each a collective that needs every worker."""
    deadline = time.time() + timeout
    while not (extracting := bool(list((chief / "data").glob(".features.tmp-*/train.npy")))):
        if time.time() > deadline or process.poll() is not None:
            break
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):  # in any case: a worker left running would hang the test
        os.killpg(process.pid, signal.SIGKILL)
    output = process.communicate()
    assert extracting, f"the chief did not start extracting; the worker's output:\n{output}"


def test_a_worker_killed_mid_extraction_stops_the_chief_in_one_line_without_features_until_a_rerun(
    augmented, one_process, tmp_path
):
    chief, worker = (copy_of(augmented, tmp_path, name) for name in ("chief", "worker"))
    processes = start_two_workers("features", chief, worker)
    kill_once_extracting(processes[1], chief)
    stopped = finished(processes[:1], timeout=300)[0]
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        "error: a worker of the cluster (TF_CONFIG) stopped or cannot be reached (TensorFlow's UnavailableError); "
        "start it and rerun the stage on every worker (dvc repro on the chief)"
    )
    assert "features:" not in stopped.stdout  # no summary line: it stopped mid-extraction
    assert not [p.name for p in (chief / "data").iterdir() if "features" in p.name]  # nor a temporary folder

    two_workers(chief, worker)
    expected, got = outputs(one_process), outputs(chief)
    assert set(got) == set(expected)
    for name, rows in expected.items():
        np.testing.assert_array_equal(got[name], rows, err_msg=name)
    assert meta_but_time(chief) == meta_but_time(one_process)


PEAK_RSS = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-m", "pipeline.stages.features"], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""


def test_a_huge_head_batch_does_not_grow_the_backbone_batch(augmented, tmp_path):
    """train.batch_size is the head's batch over feature rows; the features stage runs at most
    MAX_BACKBONE_BATCH images per pass. Padded up to 100,000 images (what it did before), the 32 px
    batch and its activations would take gigabytes."""
    peaks = {}
    for batch_size in (PER_REPLICA, 100_000):
        project = copy_of(augmented, tmp_path, f"batch{batch_size}")
        set_params(project, **{"train.batch_size": batch_size})
        peaks[batch_size] = int(run([sys.executable, "-c", PEAK_RSS], project).stdout.split()[-1])
    assert peaks[100_000] < peaks[PER_REPLICA] + 300, f"peak RSS in MiB by train.batch_size: {peaks}"
