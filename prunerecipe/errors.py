"""The exceptions users see. One base, :class:`RecipeError`, for every user mistake."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence, Union

KeyPath = tuple[Union[str, int], ...]


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
    """One finding, printed compiler-style as ``file:line:col: key.path: message``."""

    source: str
    line: int | None
    col: int | None
    path: KeyPath
    message: str

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}:{self.col}"
        return f"{where}: {format_path(self.path)}: {self.message}"

    def sort_key(self) -> tuple:
        return (self.source, self.line or 0, self.col or 0, format_path(self.path), self.message)


class RecipeError(Exception):
    """A user mistake in a recipe, a model, or their combination.

    ``problems`` lists every finding; ``str(error)`` prints one per line.
    """

    def __init__(self, problems: Problem | str | Sequence[Problem]) -> None:
        if isinstance(problems, (Problem, str)):
            problems = [problems]
        self.problems: list[Problem | str] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def collect(cls, problems: Iterable[Problem]) -> "RecipeError":
        return cls(sorted(problems, key=Problem.sort_key))


class ApplyError(RecipeError):
    """Applying a step failed; the model was restored to its state before the call."""


class CheckpointError(RecipeError):
    """A checkpoint or model spec could not be read, or does not fit the model."""
