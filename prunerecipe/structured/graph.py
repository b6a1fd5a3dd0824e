"""torch-pruning's ``DependencyGraph``, traced from example inputs within a time limit.

torch-pruning (``pip install "prunerecipe[structured]"``) is imported here, on first use,
and only here. It traces the model once (autograd from the example inputs to the output),
which tells which channels are coupled; prunerecipe never traces a graph of its own.

Two boundaries matter and torch-pruning does not mark them: the model's output (channels
that reach it cannot be removed without changing the output's shape) and its inputs (a
residual add on an input couples channels with data that has no producer). The forward
pass given to torch-pruning stands each floating-point input in for a fresh clone and
records the output's ``grad_fn``, so groups that touch either can be told.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType, ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import StructuredError, problem
from .inputs import forward

INSTALL_HINT = 'pip install "prunerecipe[structured]"'


def _default_time_limit() -> float:
    text = os.environ.get("PRUNERECIPE_TRACE_TIMEOUT", "300")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:  # inf: no limit
        warnings.warn(f"PRUNERECIPE_TRACE_TIMEOUT={text!r} is not a positive number of seconds; using 300", stacklevel=2)
        return 300.0
    return seconds


#: seconds that tracing and group building may take (torch-pruning has been seen to run for
#: minutes, or hang, over attention blocks); ``PRUNERECIPE_TRACE_TIMEOUT`` overrides it
TIME_LIMIT = _default_time_limit()


def torch_pruning() -> ModuleType:
    """The ``torch_pruning`` module, or a :class:`StructuredError` saying how to install it."""
    try:
        import torch_pruning
    except ImportError as exc:
        raise StructuredError(problem(f"dependency groups and compaction need torch-pruning: {INSTALL_HINT} ({exc})", code="structured")) from None
    return torch_pruning


class TimeLimitExceeded(Exception):
    """Tracing or group building ran past its time limit (and was stopped)."""


class _Expired(BaseException):
    """Raised inside torch-pruning's code to stop it; a BaseException, so that no
    ``except Exception`` on the way swallows it."""


_DEADLINES: list[float] = []  # ends of the limits in force, innermost last


class _TimeLimit:
    """What :func:`time_limit` returns: a context manager that stops the code inside it."""

    def __init__(self, seconds: float | None, what: str) -> None:
        self.seconds, self.what = seconds, what
        self.end = self.own_end = 0.0
        self.previous: Any = None

    def __enter__(self) -> None:
        if self.seconds is None:
            return
        self.end = self.own_end = time.monotonic() + self.seconds
        if _DEADLINES:
            self.end = min(self.end, _DEADLINES[-1])
        self.previous = sys.gettrace()
        _DEADLINES.append(self.end)
        sys.settrace(self._check)

    def _check(self, frame: FrameType, event: str, arg: Any) -> None:
        # not in our own __exit__: a body that ends just past the deadline ends normally
        if time.monotonic() > self.end and frame.f_code is not _EXIT_CODE:
            raise _Expired
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.seconds is None:
            return
        sys.settrace(self.previous)
        _DEADLINES.pop()
        if kind is not None and issubclass(kind, _Expired) and self.end == self.own_end:  # (else the outer limit's: it says so)
            raise TimeLimitExceeded(f"{self.what} took longer than {self.seconds:g} s and was stopped") from None


_EXIT_CODE = _TimeLimit.__exit__.__code__


def time_limit(seconds: float | None, what: str) -> _TimeLimit:
    """Stop the Python code run inside after ``seconds`` (checked at every Python call, through
    ``sys.settrace``: a pure-Python loop that never returns is stopped too). Inside another
    limit, the earlier end applies; None sets no limit of its own. A body that finishes is
    never stopped afterwards: the check stays out of the limit's own exit.

    Raises:
        TimeLimitExceeded: naming ``what`` and the limit.
    """
    return _TimeLimit(seconds, what)


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` (GPT-2's linear layers, weight stored ``[in, out]``) when
    transformers is already imported (a model that uses it has imported it), else None."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def _conv1d_pruner(tp: ModuleType) -> Any:
    """A torch-pruning layer pruner for transformers' ``Conv1D``: out channels are weight
    columns and the bias, in channels weight rows."""

    class Conv1DPruner(tp.pruner.function.BasePruningFunc):  # type: ignore[name-defined]
        def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> Any:
            keep = sorted(set(range(layer.nf)) - set(idxs))
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
            if layer.bias is not None:
                layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> Any:
            keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            if hasattr(layer, "nx"):
                layer.nx = len(keep)
            return layer

        def get_out_channels(self, layer: Any) -> int:
            return int(layer.nf)

        def get_in_channels(self, layer: Any) -> int:
            return int(layer.weight.shape[0])

    return Conv1DPruner()


_CONV1D_PRUNER: list[Any] = []


def custom_pruners(tp: ModuleType) -> dict[type, Any]:
    """Layer pruners torch-pruning lacks, keyed by layer type (today: transformers' Conv1D)."""
    conv1d = conv1d_type()
    if conv1d is None:
        return {}
    if not _CONV1D_PRUNER:
        _CONV1D_PRUNER.append(_conv1d_pruner(tp))
    return {conv1d: _CONV1D_PRUNER[0]}


def layer_pruner(module: nn.Module) -> Any:
    """torch-pruning's pruner for one layer (``prune_out_channels``/``prune_in_channels``), or None."""
    tp = torch_pruning()
    custom = custom_pruners(tp)
    for cls, pruner in custom.items():
        if isinstance(module, cls):
            return pruner
    return tp.pruner.function.PrunerBox.get(tp.ops.module2type(module))


@dataclass
class Graph:
    """A traced dependency graph and what prunerecipe needs to read groups from it."""

    dg: Any
    names: dict[int, str]
    outputs: tuple[Any, ...] = field(repr=False)  # grad_fns of the model's output
    inputs: tuple[Any, ...] = field(repr=False)  # grad_fns standing for its floating-point inputs
    tp: ModuleType = field(repr=False)
    order: dict[int, int] = field(default_factory=dict, repr=False)  # id(module) -> named_modules() position

    def is_output(self, grad_fn: Any) -> bool:
        return any(grad_fn is g for g in self.outputs)

    def is_input(self, grad_fn: Any) -> bool:
        return any(grad_fn is g for g in self.inputs)


def _stand_ins(value: Any, marks: list[Any]) -> Any:
    """``value`` with each floating-point tensor (in tuples, lists and dicts too) replaced by a
    clone that requires grad, whose ``grad_fn`` is recorded in ``marks``."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value
        clone = value.detach().requires_grad_(True).clone()
        marks.append(clone.grad_fn)
        return clone
    if isinstance(value, (tuple, list)):
        return type(value)(_stand_ins(v, marks) for v in value) if type(value) in (tuple, list) else value
    if isinstance(value, dict) and type(value) is dict:
        return {k: _stand_ins(v, marks) for k, v in value.items()}
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in an output (tuples, lists, mappings, dataclass-like model outputs)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        items: Any = value.values()
    elif isinstance(value, (tuple, list)):
        items = value
    else:
        return []
    return [t for v in items for t in tensors_in(v)]


def module_names(model: nn.Module) -> dict[int, str]:
    """Qualified names by object id, in model order: every module, and each parameter right
    after its module (torch-pruning gives a parameter used outside a layer, such as an RMSNorm's
    scale, a node of its own: named so, it reads ``model.norm.weight``)."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
        for pname, param in module.named_parameters(recurse=False):
            names.setdefault(id(param), f"{name}.{pname}" if name else pname)
    return names


def trace(
    module: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    names: Mapping[int, str] | None = None,
    whole_model: bool = True,
    seconds: float | None = None,
) -> Graph:
    """Build torch-pruning's dependency graph of ``module`` called on ``args``/``kwargs``.

    For the whole model (``whole_model``) the outputs are the tensors the model is judged by
    (:func:`~prunerecipe.structured.inputs.forward`: every tensor it returns; a Hugging Face model's logits); for a
    part of it, every tensor it returns (all of them flow on). ``names`` gives qualified
    names from the whole model. Every module's train/eval mode is put back afterwards
    (torch-pruning switches to eval and leaves it so); nothing else changes.

    Raises:
        StructuredError: torch-pruning is not installed.
        TimeLimitExceeded: past ``seconds`` (default :data:`TIME_LIMIT`).
        Exception: whatever the forward pass or torch-pruning raises.
    """
    tp = torch_pruning()
    modes = [(m, m.training) for m in module.modules()]
    outputs: list[Any] = []
    stand_ins: list[Any] = []
    call_kwargs = dict(kwargs or {})

    def forward_fn(target: nn.Module, xs: Sequence[Any]) -> Any:
        staged = _stand_ins(list(xs), stand_ins)
        extra = _stand_ins(call_kwargs, stand_ins)
        if whole_model:
            out = forward(target, staged, extra)
        else:
            out = tensors_in(target(*staged, **extra))
        out = [o for o in out if o is not None and o.grad_fn is not None]
        outputs.extend(o.grad_fn for o in out)
        return out

    try:
        with torch.enable_grad(), time_limit(TIME_LIMIT if seconds is None else seconds, "tracing the model's dependency graph (torch-pruning)"):
            dg = tp.DependencyGraph().build_dependency(
                module, example_inputs=list(args), forward_fn=forward_fn, customized_pruners=custom_pruners(tp), verbose=False
            )
    finally:
        for m, mode in modes:
            m.training = mode
    if names is None:
        names = module_names(module)
    order = {key: i for i, key in enumerate(names)}
    return Graph(dg, dict(names), tuple(outputs), tuple(stand_ins), tp, order)
