"""TensorFlow's C++ log as the stages show it (pipeline/cli.py, applied in stage processes by pipeline/stages/__init__.py): warnings and errors, not INFO,
also for the lines its libraries log while they load; a TF_CPP_MIN_LOG_LEVEL of the user's own wins."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

# Loads TensorFlow through the pipeline package, as every stage does, then makes TensorFlow log a
# C++ warning at run time, long after it read TF_CPP_MIN_LOG_LEVEL.
PARTLY_READ_CACHE = "import pipeline.stages, tensorflow as tf\nnext(iter(tf.data.Dataset.range(4).cache()))\n"
WARNING = re.compile(r"^W\d{4} .*\] The calling iterator did not fully read the dataset being cached", re.M)
INFO = re.compile(r"^I\d{4} .*\] oneDNN custom operations are on", re.M)  # logged while TensorFlow loads


def tensorflow_stderr(level: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # this process has the default
    env |= {"TF_ENABLE_ONEDNN_OPTS": "1"} | ({"TF_CPP_MIN_LOG_LEVEL": level} if level else {})
    return subprocess.run(
        [sys.executable, "-c", PARTLY_READ_CACHE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stderr


@pytest.mark.parametrize("level, info, warning", [(None, False, True), ("0", True, True), ("2", False, False)])
def test_tensorflow_log_shows_the_levels_asked_for(level, info, warning):
    shown = tensorflow_stderr(level)
    assert bool(INFO.search(shown)) == info, shown
    assert bool(WARNING.search(shown)) == warning, shown
    if level is None:
        assert not re.search(r"^I\d{4} ", shown, re.M) and "absl::InitializeLog" not in shown, shown
