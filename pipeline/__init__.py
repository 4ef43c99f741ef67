"""Transfer-learning pipeline for image classification.

Each stage is a module runnable as ``python -m pipeline.<stage>``; stages talk only through
files under ``data/`` and the validated config built from ``params.yaml``.
"""

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator

# Keras 3 runs on TensorFlow unless the user chose another backend.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow's C++ log: warnings and errors, not INFO (0 shows INFO too, 2 only errors).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# MLflow's own log: warnings, not its INFO notes (database set-up, input-example checks, system metrics).
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# ... and no progress bars when we copy a model out of its store (predict --model models:/...).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# A line of TensorFlow's C++ log (absl's format): "I0000 00:00:1796132670.822006    3742 port.cc:153] ...".
ABSL_LINE = re.compile(rb"([IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")
ABSL_PRE_INIT = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
SEVERITIES = b"IWEF"  # TF_CPP_MIN_LOG_LEVEL 0..3


def kept_startup_line(line: bytes, min_level: int) -> bool:
    """Whether a line TensorFlow's libraries wrote to stderr while loading is shown: absl's notice that
    nothing called absl::InitializeLog() never is; a log line is when its severity is at least ``min_level``."""
    if line.startswith(ABSL_PRE_INIT):
        return False
    match = ABSL_LINE.match(line)
    return not match or SEVERITIES.index(match.group(1)) >= min_level


@contextlib.contextmanager
def stderr_filtered(keep: Callable[[bytes], bool]) -> Iterator[None]:
    """Holds what the block writes to file descriptor 2 (where C++ code logs), then writes the lines ``keep``s."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            os.write(2, b"".join(line for line in held if keep(line)))


class QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """``import tensorflow``, wherever it first happens, with TF_CPP_MIN_LOG_LEVEL applied to the lines its
    libraries log while they load. Their static initializers log before TensorFlow reads the variable
    (TF 2.21: "oneDNN custom operations are on", an INFO line, once per library, each after absl's
    pre-InitializeLog notice), so TensorFlow's own filter misses them; later lines it filters itself."""

    def __init__(self, min_level: int):
        self.min_level = min_level

    def find_spec(self, name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path) if name == "tensorflow" else None
        if spec is not None and spec.loader is not None:
            spec.loader = FilteredLoad(spec.loader, self.min_level)
        return spec


class FilteredLoad(importlib.abc.Loader):
    """``loader``, running the module with only the kept_startup_line lines of its log shown."""

    def __init__(self, loader: importlib.abc.Loader, min_level: int):
        self.loader = loader
        self.min_level = min_level

    def __getattr__(self, name):  # get_resource_reader, get_filename, ...
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with stderr_filtered(lambda line: kept_startup_line(line, self.min_level)):
            self.loader.exec_module(module)


if os.environ["TF_CPP_MIN_LOG_LEVEL"].isdigit() and int(os.environ["TF_CPP_MIN_LOG_LEVEL"]) > 0:
    sys.meta_path.insert(0, QuietTensorFlowImport(int(os.environ["TF_CPP_MIN_LOG_LEVEL"])))
