"""How a stage process ends: a finished stage skips the interpreter's teardown (about a second with
TensorFlow loaded), yet its atexit handlers run, its output is flushed and no thread's work is cut."""

import os
import subprocess
import sys
import textwrap

from conftest import REPO

STAGE = textwrap.dedent("""
    import atexit, os, sys, threading, time
    from pipeline.cli import run_stage

    class Teardown:
        def __del__(self):  # runs when the interpreter frees this module's globals
            os.write(1, b" torn down")

    marker = Teardown()

    def later():
        time.sleep(0.5)
        with open(os.environ["MARKER"], "a") as fh:
            fh.write("thread finished;")

    def main():
        atexit.register(lambda: open(os.environ["MARKER"], "a").write("atexit ran;"))
        if os.environ.get("THREAD"):
            threading.Thread(target=later).start()
        print("stage done", end="")  # buffered: stdout is a pipe

    run_stage(main)
""")


def run_stage_program(tmp_path, **env) -> tuple[subprocess.CompletedProcess, str]:
    marker = tmp_path / "marker"
    result = subprocess.run(
        [sys.executable, "-c", STAGE],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # where it notes its wall time (.dvc/tmp/stage_times.json), as a stage in its project
        env={**os.environ, "PYTHONPATH": str(REPO), "MARKER": str(marker), **env},
    )
    return result, marker.read_text() if marker.exists() else ""


def test_a_finished_stage_exits_without_the_teardown_after_its_atexit_handlers(tmp_path):
    result, marker = run_stage_program(tmp_path)
    assert (result.returncode, result.stdout, marker) == (0, "stage done", "atexit ran;"), result.stderr


def test_a_thread_still_working_is_waited_for(tmp_path):
    result, marker = run_stage_program(tmp_path, THREAD="1")
    assert result.returncode == 0, result.stderr
    assert marker == "thread finished;atexit ran;"
    assert result.stdout == "stage done torn down"  # the ordinary exit, teardown included


def test_a_reader_that_stops_early_gets_no_traceback(workdir):
    """`python -m pipeline.tools.summary | head -1`: head exits after one line, later writes meet a closed pipe."""
    (workdir / "eval").mkdir()
    (workdir / "eval" / "metrics.json").write_text(
        '{"accuracy": 0.9, "macro": {"f1": 0.8}, "ece": 0.05, "test_images": 10, '
        '"accuracy_ci95": {"low": 0.6, "high": 0.98}, "macro_f1_ci95": {"low": 0.5, "high": 0.95}}'
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.summary"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")  # 128 + SIGPIPE, as `yes | head -1` ends
