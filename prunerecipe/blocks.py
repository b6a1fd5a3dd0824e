"""The blocks calibration-based steps process one at a time, in order.

From the recipe's ``sequential: {blocks: pattern}`` (every module whose qualified name matches,
not counting modules inside an earlier match), or for Hugging Face models automatically: the
layers of the model's one ``nn.ModuleList`` whose members are of a class the model lists in
``_no_split_modules`` (``GPT2Block``, ``LlamaDecoderLayer``, ``BertLayer``, ...). Any other
model is one block, the whole model.

Blocks must run one after another, each taking the previous one's output as its first
argument (the hidden states) and the same other arguments: the layers of a transformer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .errors import SelectorError
from .layout import is_linear_like
from .select import Target, check_name_pattern
from .spec import Sequential
from .text import listing, short, suggest


@dataclass(frozen=True)
class Blocks:
    """The blocks of a model, in the order they run; ``how`` says where they came from."""

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    how: str

    @property
    def whole_model(self) -> bool:
        return self.names == ("",)

    def index_of(self, module_name: str) -> int | None:
        """The block holding the module named ``module_name``, or None when it is in none."""
        for i, name in enumerate(self.names):
            if not name or module_name == name or module_name.startswith(name + "."):
                return i
        return None

    def describe(self) -> str:
        if self.whole_model:
            return f"the whole model as one block ({self.how})"
        first, last = self.names[0], self.names[-1]
        span = first if len(self.names) == 1 else f"{first} .. {last}"
        return f"{len(self.names)} block(s) {span} ({self.how})"


def find_blocks(model: nn.Module, sequential: Sequential | None) -> Blocks:
    """The blocks of ``model`` (see the module's docstring).

    Args:
        model: the model.
        sequential: the recipe's ``sequential`` section, if any.

    Returns:
        The :class:`Blocks`.

    Raises:
        SelectorError: the pattern matches nothing, or a Hugging Face model has candidate
            layers in several lists (the recipe must then name them).
    """
    named = list(model.named_modules())
    if sequential is not None:
        return _by_pattern(named, sequential.blocks)
    classes: set[str] = set()
    for _, module in named:
        found = getattr(type(module), "_no_split_modules", None)
        if hasattr(module, "config") and isinstance(found, (list, tuple, set)):
            classes.update(str(c) for c in found)
    if not classes:
        return Blocks(("",), (model,), "not a Hugging Face model, and no sequential.blocks")
    lists: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in named:
        if isinstance(module, nn.ModuleList):
            members = [(f"{name}.{key}", child) for key, child in module.named_children() if type(child).__name__ in classes]
            if members:
                lists[name] = members
    if not lists:
        return Blocks(("",), (model,), f"no nn.ModuleList of {', '.join(sorted(classes))}")
    if len(lists) > 1:
        raise SelectorError(
            f"the model has layers to process in several lists ({', '.join(lists)}); name the blocks with sequential: {{blocks: <pattern>}}"
        )
    ((list_name, members),) = lists.items()
    kinds = sorted({type(m).__name__ for _, m in members})
    return Blocks(tuple(n for n, _ in members), tuple(m for _, m in members), f"{', '.join(kinds)} in {list_name}, found automatically")


def _by_pattern(named: Sequence[tuple[str, nn.Module]], pattern: str) -> Blocks:
    matches = check_name_pattern(pattern)
    names: list[str] = []
    modules: list[nn.Module] = []
    for name, module in named:
        if matches(name) and not any(name == b or name.startswith(b + ".") or not b for b in names):
            names.append(name)
            modules.append(module)
    if not names:
        all_names = [n for n, _ in named if n]
        raise SelectorError(f"blocks {short(pattern)} match no module{suggest(pattern, all_names)}; {listing('module names', all_names)}")
    return Blocks(tuple(names), tuple(modules), f"sequential.blocks {pattern!r}")


def calibration_target_problem(targets: list[Target], blocks: Blocks) -> str | None:
    """Calibration statistics are collected at the inputs of Linear and Conv1D layers inside the blocks."""
    for t in targets:
        if not is_linear_like(t.module) or t.param != "weight":
            return (
                f"{t.qualname}: steps that need calibration data prune the weights of nn.Linear and Conv1D layers "
                f"(whose inputs calibration sees), not a {t.module_type}'s {t.param!r}"
            )
        if blocks.index_of(t.module_name) is None:
            return f"{t.qualname} is outside every block ({blocks.describe()}); exclude it, or name blocks that hold it in sequential.blocks"
    return None
