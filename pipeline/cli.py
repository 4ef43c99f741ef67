"""Entry-point wrapper shared by every stage: user mistakes become one line, not a traceback."""

import errno
import inspect
import sys
from collections.abc import Callable

# Write failures a user fixes on their side (space, permissions), not bugs in the stage.
STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or process limits",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


class UserError(Exception):
    """A problem the user can fix (bad params, bad input file, no network): shown as one line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_summary(err: BaseException) -> str:
    """``TypeName: first line``, to quote a library's error inside one of ours."""
    return f"{type(err).__name__}: {first_line(err)}" if str(err).strip() else first_line(err)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``, turning user mistakes into one line and an exit code of 2.

    A DVC stage (a ``main`` without parameters) reads only params.yaml and files: ``--help`` prints
    its module's docstring (what it reads and writes) without running it, and any other argument is
    refused. Tools with options of their own (``main(argv)``) parse them with argparse.
    """
    if not inspect.signature(main).parameters and len(sys.argv) > 1:
        if sys.argv[1:] in (["-h"], ["--help"]):
            print(inspect.cleandoc(sys.modules[main.__module__].__doc__ or ""))
            sys.exit(0)
        print(f"error: the stage takes no arguments (got {' '.join(sys.argv[1:])}): its settings are in "
              "params.yaml (`dvc exp run -S key=value` for one run); --help says what it reads and writes",
              file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: {STORAGE_ERRORS[err.errno]}{where}: free space or fix permissions and rerun; "
              "outputs of earlier runs are untouched", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
