"""Entry-point wrapper shared by every stage: user mistakes become one line, not a traceback."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (bad params, bad input file, no network): shown as one line."""


def run_stage(main: Callable[[], None]) -> None:
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
