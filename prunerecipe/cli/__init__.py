"""The ``prunerecipe`` command line. Thin: parse options, call the library, print.

Exit codes: 0 success, 1 bad input (recipe, model, checkpoint, files), 2 usage errors.
"""

from __future__ import annotations

from . import apply, commands  # noqa: F401  (they register their commands on the group)
from .apply import _stream_progress
from .base import EXIT_INPUT, EXIT_OK, EXIT_USAGE, _closed_stdout, cli


def main(argv: list[str] | None = None) -> None:
    """The ``prunerecipe`` command."""
    try:
        cli.main(args=argv, prog_name="prunerecipe")
    except BrokenPipeError:
        _closed_stdout()


__all__ = ["EXIT_INPUT", "EXIT_OK", "EXIT_USAGE", "_stream_progress", "cli", "main"]
