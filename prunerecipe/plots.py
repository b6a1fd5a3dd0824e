"""Per-layer sparsity as a picture (``report --plot``, ``plan --plot``; ``pip install 'prunerecipe[plot]'``).

One horizontal bar per tensor, in model order from the top, before (light) and after (dark)
when both are known; the figure grows with the number of tensors, so 200+ layers stay
readable. Drawn with matplotlib's object API (no pyplot: the caller's backend is untouched).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .checkpoint.files import atomic_file
from .errors import RecipeError, problem


def sparsity_chart(
    path: str, rows: Sequence[tuple[str, float | None]], *, title: str, before: Sequence[float | None] | None = None, measure: str = "0 or masked"
) -> None:
    """Draw per-tensor sparsity into ``path`` (``.png`` or ``.svg``), atomically.

    Args:
        path: the picture to write (replaced if it exists).
        rows: ``(tensor name, sparsity after)`` in model order; None where it is not known.
        title: the figure's title (say the global figure there).
        before: the sparsity before, per row, when there is one.
        measure: what a bar counts, for the axis ("0 or masked"; a plan's: "masked").

    Raises:
        RecipeError: matplotlib is missing or the suffix is neither .png nor .svg.
    """
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix not in ("png", "svg"):
        raise RecipeError(problem(f"a picture is .png or .svg, not {suffix or '(no suffix)'!r}", source=path, code="usage"))
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RecipeError(problem("pictures need matplotlib: pip install 'prunerecipe[plot]'", source=path, code="usage")) from None

    n = max(len(rows), 1)
    per_row = 0.22 if n <= 300 else 0.16
    fig = Figure(figsize=(10, max(2.5, 1.4 + per_row * n)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(n))
    after = [100.0 * (v or 0.0) for _, v in rows]
    if before is not None:
        ax.barh(ys, [100.0 * (b or 0.0) for b in before], height=0.8, color="#b7cde6", label="before")
        ax.barh(ys, after, height=0.4, color="#1f5a96", label="after")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.barh(ys, after, height=0.7, color="#1f5a96")
    for y, (_, v) in zip(ys, rows):
        if v is None:
            ax.text(1, y, "unknown until applied", va="center", fontsize=6, color="#888888")
    ax.set_yticks(ys)
    ax.set_yticklabels([name for name, _ in rows], fontsize=7 if n <= 300 else 5)
    ax.invert_yaxis()  # model order from the top
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"sparsity (% of entries that are {measure})")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, format=suffix, dpi=100)
