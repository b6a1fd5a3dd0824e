"""Every exception prunerecipe raises for a user mistake, and the :class:`Problem` they carry.

One base, :class:`RecipeError`; a subclass per stage (applying, checkpoints, model specs,
methods, selectors, calibration data). Each finding is a :class:`Problem` with a location, a short ``code``
and ``to_dict()`` for machine-readable output (``--json``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

KeyPath = tuple[str | int, ...]


def format_path(path: KeyPath) -> str:
    """``("steps", 1, "amount")`` -> ``"steps[1].amount"``; the empty path is ``"(root)"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


@dataclass(frozen=True)
class Problem:
    """One finding, printed compiler-style as ``file:line:col: key.path: message``.

    ``path`` is the key path inside a recipe; ``None`` when the problem is not about a place
    in a recipe (a checkpoint, a model spec, an output file): then only ``source`` leads.
    ``code`` names the kind of problem (``yaml``, ``unknown-key``, ``no-targets``, ...).
    """

    source: str
    line: int | None
    col: int | None
    path: KeyPath | None
    message: str
    code: str = "invalid"

    def __post_init__(self) -> None:
        # a value pasted whole into a key or a message (a 3,000-character method name, say) is
        # shown cut: enough to recognize it, not a screenful
        object.__setattr__(self, "message", _LONG_WORD.sub(_cut, self.message))
        if self.path is not None and any(isinstance(k, str) and len(k) > _WORD_LIMIT for k in self.path):
            cut = tuple(k[: _WORD_LIMIT - 3] + "..." if isinstance(k, str) and len(k) > _WORD_LIMIT else k for k in self.path)
            object.__setattr__(self, "path", cut)

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}:{self.col}"
        parts = [where] if where else []
        if self.path is not None:
            parts.append(format_path(self.path))
        parts.append(self.message)
        return ": ".join(parts)

    def sort_key(self) -> tuple[Any, ...]:
        return (self.source, self.line or 0, self.col or 0, format_path(self.path or ()), self.message)

    def to_dict(self) -> dict[str, Any]:
        """``{file, line, col, path, code, message}``, as ``--json`` prints it."""
        return {
            "file": self.source or None,
            "line": self.line,
            "col": self.col,
            "path": None if self.path is None else format_path(self.path),
            "code": self.code,
            "message": self.message,
        }


_WORD_LIMIT = 80
_LONG_WORD = re.compile(r"[^\s,;()\[\]/\\]{" + str(_WORD_LIMIT + 41) + ",}")  # paths are left whole (each part is short)


def _cut(match: re.Match[str]) -> str:
    word = match.group(0)
    return f"{word[:_WORD_LIMIT]}...({len(word)} characters)"


def problem(message: str, *, source: str = "", code: str = "invalid") -> Problem:
    """A :class:`Problem` that is not located inside a recipe (a file, a model, a spec)."""
    return Problem(source, None, None, None, message, code)


class RecipeError(Exception):
    """A user mistake in a recipe, a model, a checkpoint or their combination.

    ``problems`` lists every finding; ``str(error)`` prints one per line.
    """

    #: the ``code`` of problems made from a plain message
    code = "invalid"

    def __init__(self, problems: Problem | str | Sequence[Problem]) -> None:
        if isinstance(problems, str):
            problems = [problem(problems, code=self.code)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def collect(cls, problems: Iterable[Problem]) -> RecipeError:
        """One error listing ``problems`` in file order, each once."""
        unique: dict[str, Problem] = {}
        for p in sorted(problems, key=Problem.sort_key):
            unique.setdefault(str(p), p)
        return cls(list(unique.values()))

    def to_list(self) -> list[dict[str, Any]]:
        """Every problem as a dict (see :meth:`Problem.to_dict`)."""
        return [p.to_dict() for p in self.problems]


class Terminated(SystemExit):
    """A stop asked from outside (the command line's SIGTERM handler raises it): never reported
    as a failure of the code that happened to run (a model factory, a plugin's import)."""


class RecipeWarning(UserWarning):
    """Something in a recipe that works, but likely not as meant (the CLI prints these)."""


class ApplyError(RecipeError):
    """Applying a step failed; the model was restored to its state before the call."""

    code = "apply"


class CheckpointError(RecipeError):
    """A checkpoint could not be read or written, or does not fit the model."""

    code = "checkpoint"


class ModelSpecError(RecipeError):
    """A model spec that does not import, or does not give an ``nn.Module``."""

    code = "model"


class MethodError(RecipeError):
    """A method name that cannot be resolved to a usable method."""

    code = "method"


class CalibrationError(RecipeError):
    """Calibration data that cannot be used: missing, empty, of the wrong type or shape, not
    finite, or a calibration spec that does not import (the model is left unchanged)."""

    code = "calibration"


class SelectorError(RecipeError):
    """A selector that cannot be compiled, or resolves to nothing (located by the caller)."""

    code = "select"


class ReparametrizedError(SelectorError):
    """A selected parameter is computed by something other than torch's pruning (a
    ``torch.nn.utils.parametrize`` parametrization, ``weight_norm``, ``spectral_norm``)."""

    code = "reparametrized"


class StructuredError(ApplyError):
    """Dependency groups or compaction could not be carried out (inconsistent group masks,
    unsupported layers, a failed output check, a time limit); the model was left unchanged."""

    code = "structured"
