"""The ``prunerecipe`` command line. Thin: parse options, call the library, print.

Exit codes: 0 success, 1 bad input (recipe, model, checkpoint, files), 2 usage errors.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from ..errors import Terminated
from . import apply, commands  # noqa: F401  (they register their commands on the group)
from .apply import _stream_progress
from .base import EXIT_INPUT, EXIT_OK, EXIT_USAGE, _closed_stdout, cli

#: the exit code of a run stopped by SIGTERM (128 + the signal's number, as shells report it)
EXIT_TERMINATED = 128 + signal.SIGTERM


def _terminated(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (``kill``, a job scheduler's time limit) unwinds like Ctrl-C: the model is rolled
    back and temp files beside the outputs are removed, where the default action would leave them."""
    print("prunerecipe: terminated (SIGTERM)", file=sys.stderr)
    raise Terminated(EXIT_TERMINATED)


def main(argv: list[str] | None = None) -> None:
    """The ``prunerecipe`` command."""
    handle = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if handle:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(args=argv, prog_name="prunerecipe")
    except BrokenPipeError:
        _closed_stdout()
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


__all__ = ["EXIT_INPUT", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE", "_stream_progress", "cli", "main"]
