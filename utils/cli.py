"""What every entry point shares: the error a user can act on, and how ``main`` turns it into exit 2.

Library code raises a subclass of :class:`UsageError` for any input or state it cannot use; the
message is one line that names the file or flag, says what is wrong and what to do. Entry points
wrap their work in :func:`run_main`, which prints ``{prog}: error: {message}`` on stderr and
returns 2. Nothing else is caught there: a bug still ends in a traceback (exit 1).
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_UNUSABLE = 2  # the run did not start or stopped on an input it cannot use; nothing was written


class UsageError(Exception):
    """An input, flag or on-disk state the run cannot use (one-line message: what, why, what to do)."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file or folder the run needs does not exist (the message names it and the flag that sets it)."""


def run_main(prog: str, work: Callable[[], object]) -> int:
    """The exit status ``work()`` returns (an int; any other result, e.g. a report, means 0); a
    :class:`UsageError` becomes one line on stderr and exit 2."""
    try:
        status = work()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_UNUSABLE
    return status if isinstance(status, int) else 0
