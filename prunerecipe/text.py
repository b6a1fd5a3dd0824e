"""Small text helpers shared by messages, plans and reports: one place for each wording rule."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from typing import Any

#: Values quoted in messages are cut to about this many characters.
SHORT = 80


def short(value: Any, limit: int = SHORT) -> str:
    """``repr(value)``, cut to ``limit`` characters with an ellipsis (a 40k glob stays readable)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = SHORT) -> str:
    """``text`` itself, cut to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def listing(what: str, items: Sequence[str], limit: int = 8) -> str:
    """``"what: a, b, ... (3 more)"``: at most ``limit`` items shown."""
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{what}: {shown}"


def pct(x: float) -> str:
    """A fraction as a percentage with two decimals: ``0.5`` -> ``"50.00%"``."""
    return f"{100.0 * x:.2f}%"


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Left-aligned columns, two spaces apart; one string per line, header first."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(str(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in cells]


def shape_text(shape: Sequence[int]) -> str:
    """``(6, 1, 3, 3)`` -> ``"6x1x3x3"``; a scalar is ``"scalar"``."""
    return "x".join(map(str, shape)) or "scalar"


def shown_path(path: str) -> str:
    """``path`` relative to the current folder when it lies inside it (as a user would type it)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return rel if not rel.startswith("..") else path
