"""Entry-point wrapper shared by every stage: user mistakes become one line, not a traceback."""

import atexit
import contextlib
import ctypes
import errno
import functools
import importlib.abc
import importlib.machinery
import inspect
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from tqdm import tqdm

from pipeline.files import read_json, sweep_outputs, write_json
from pipeline.paths import STAGE_TIMES

# Write failures a user fixes on their side (space, permissions), not bugs in the stage.
STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or process limits",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # of those, the ones never about a file being read
PR_SET_DEATHSIG = 1  # from <linux/prctl.h>
T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix (bad params, bad input file, no network): shown as one line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_summary(err: BaseException) -> str:
    """``TypeName: first line``, to quote a library's error inside one of ours."""
    return f"{type(err).__name__}: {first_line(err)}" if str(err).strip() else first_line(err)


def redact_url(value: str) -> str:
    """``value`` as we may print, write or log it: ``https://user:token@host/x?sig=s`` ->
    ``https://user:***@host/x?sig=***`` (a user name alone, often a token, -> ``***@host``);
    anything that is not a URL with a host comes back unchanged."""
    parsed = urlsplit(value)
    if not parsed.scheme or not parsed.netloc:
        return value
    user, at, host = parsed.netloc.rpartition("@")
    if at:
        user = f"{parsed.username}:***" if parsed.password is not None else "***"
    query = "&".join(f"{k}=***" if v else k for k, v in parse_qsl(parsed.query, keep_blank_values=True))
    return urlunsplit((parsed.scheme, f"{user}{at}{host}", parsed.path, query, parsed.fragment))


@functools.cache  # once per process: fork handlers cannot be removed
def die_with_parent() -> None:
    """Make every process this one forks, the stages' worker pools, get SIGKILL when it dies
    (Linux; pools start their workers by fork there). A stage killed with SIGKILL would
    otherwise leave workers blocked forever on a queue nobody writes, or still writing."""
    if not sys.platform.startswith("linux"):
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def remember_parent() -> None:
        nonlocal parent
        parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_DEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    os.register_at_fork(before=remember_parent, after_in_child=in_child)


LOG_EVERY_S = 30  # off a terminal (a CI log, `dvc queue logs`), a long loop says how far it got this often


def progress(items: Iterable[T], total: int, desc: str, unit: str) -> Iterator[T]:
    """``items``, with tqdm's progress bar on a terminal; elsewhere one line every LOG_EVERY_S seconds
    (``features: 1200/3670 batch, 41 s``), so a long stage is never silent in a log."""
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit)
        return
    started = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= LOG_EVERY_S and done < total:
            print(f"{desc}: {done}/{total} {unit}, {now - started:.0f} s", file=sys.stderr, flush=True)
            last = now


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``, turning user mistakes into one line and an exit code of 2.

    A DVC stage (a ``main`` without parameters) reads only params.yaml and files: ``--help`` prints
    its module's docstring (what it reads and writes) without running it, and any other argument is
    refused. Tools with options of their own (``main(argv)``) parse them with argparse.
    """
    # Only for the command line (``python -m pipeline.<stage>``): a test calling run_stage has argv of its own.
    as_program = main.__module__ == "__main__"
    if as_program and not inspect.signature(main).parameters and len(sys.argv) > 1:
        if sys.argv[1:] in (["-h"], ["--help"]):
            print(inspect.cleandoc(sys.modules[main.__module__].__doc__ or ""))
            sys.exit(0)
        print(
            f"error: the stage takes no arguments (got {' '.join(sys.argv[1:])}): its settings are in "
            "params.yaml (`dvc exp run -S key=value` for one run); --help says what it reads and writes",
            file=sys.stderr,
        )
        sys.exit(2)
    die_with_parent()
    sweep_outputs()
    started = time.monotonic()
    try:
        main()
        sys.stdout.flush()  # here, so that a reader gone away is handled below
    except BrokenPipeError:
        reader_gone()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        if as_program:  # no teardown: TensorFlow's, after a failed collective, prints tracebacks after the line
            exit_without_teardown(2)
        sys.exit(2)
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        target = err.filename2 or err.filename  # a copy's error names its source first
        where = f" writing {target}" if target else ""
        print(
            f"error: {STORAGE_ERRORS[err.errno]}{where}: free space or fix permissions and rerun; "
            "nothing half-written was left",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if as_program:
        spec = sys.modules["__main__"].__spec__
        stage = stage_name(spec.name) if spec else ""
        if stage:  # a DVC stage: the summary shows its wall time
            record_stage_time(stage, time.monotonic() - started)
        exit_without_teardown()


def stage_name(module: str) -> str:
    """``train`` for the stage module ``pipeline.stages.train``; '' for any other module."""
    return module.removeprefix("pipeline.stages.") if module.startswith("pipeline.stages.") else ""


def record_stage_time(stage: str, seconds: float) -> None:
    """Note how long the stage ``stage`` took, in STAGE_TIMES (``make run``'s summary prints them)."""
    times = read_json(STAGE_TIMES) if STAGE_TIMES.is_file() else {}
    times[stage] = {"seconds": round(seconds, 1), "finished": datetime.now(UTC).isoformat(timespec="seconds")}
    STAGE_TIMES.parent.mkdir(parents=True, exist_ok=True)
    write_json(STAGE_TIMES, times)


def reader_gone() -> None:
    """End quietly when the program reading stdout stopped (``... | head -1``), as other command-line
    tools do, rather than with a BrokenPipeError traceback: what is still buffered goes nowhere."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the final flush cannot fail again
    sys.exit(128 + signal.SIGPIPE)


def exit_without_teardown(code: int = 0) -> None:
    """End a process whose work is done without the interpreter's teardown: about a second once
    TensorFlow is loaded (freeing thousands of modules, stopping its native runtime), none of it
    needed by a stage whose files are written and closed. The atexit handlers still run (logging's
    flush, temporary folders' removal, MLflow's); while another non-daemon thread is alive, whose
    work this would cut short, the process exits the ordinary way, after it."""
    if any(thread is not threading.main_thread() and not thread.daemon for thread in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def quiet_tensorflow_import() -> None:
    """Apply TF_CPP_MIN_LOG_LEVEL to TensorFlow's start-up lines too, in this process (a stage's: the
    ``pipeline.stages`` package calls it; serving and library users keep TensorFlow's own behaviour)."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "")
    if level.isdigit() and int(level) > 0 and not any(isinstance(f, QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorFlowImport(int(level)))
