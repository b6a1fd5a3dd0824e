"""Groups built over what a step selects: each layer's group is read from a trace of the
smallest enclosing module that holds the whole group.

torch-pruning has been seen to run for minutes, hang, or fail over attention blocks, and a
group of MLP channels never leaves its MLP. So a layer's group is first read from a trace
of the layer's parent module alone (called on the inputs it received in one forward pass
of the whole model); only a group that reaches that module's output or inputs (a residual
stream) is read again from the next module up, up to the whole model. A trace that fails
above the first level leaves the groups that needed it skipped, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..text import listing
from .graph import TIME_LIMIT, Graph, TimeLimitExceeded, module_names, time_limit, trace
from .groups import Found, read_group


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    count: int = 1


def _capture(model: nn.Module, inputs: Sequence[torch.Tensor], wanted: set[int]) -> dict[int, _Call]:
    """The arguments each ``wanted`` module was called with in one forward pass of the model
    (no grad, eval mode; modes put back)."""
    calls: dict[int, _Call] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen = calls.get(id(module))
        if seen is None:
            calls[id(module)] = _Call(args, dict(kwargs))
        else:
            seen.count += 1

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if id(m) in wanted]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return calls


def discover(
    model: nn.Module, inputs: Sequence[torch.Tensor], roots: Sequence[tuple[str, nn.Module]], chosen: set[int], seconds: float | None = None
) -> Found:
    """The groups of ``roots``' output channels, each once, each from the smallest trace that holds it.

    A group is skipped (with the reason) when it reaches the model's output or an input,
    when a producer in it is not ``chosen`` (ids of modules), or when the trace it needs
    fails. Kept groups with members that cannot be masked per channel are listed under
    ``unsupported``.

    Raises:
        TimeLimitExceeded: past ``seconds`` in all (default ``PRUNERECIPE_TRACE_TIMEOUT``, 300).
        Exception: tracing the whole model failed for a layer whose parent is the model.
    """
    names = module_names(model)
    parent: dict[int, nn.Module] = {}
    for module in model.modules():
        for child in module.children():
            parent.setdefault(id(child), module)
    ancestors: set[int] = set()
    for _, root in roots:
        p = parent.get(id(root))
        while p is not None and p is not model:
            ancestors.add(id(p))
            p = parent.get(id(p))
    found = Found()
    with time_limit(TIME_LIMIT if seconds is None else seconds, "building dependency groups (torch-pruning)"):
        calls = _capture(model, inputs, ancestors) if ancestors else {}

        def enclosing(module: nn.Module) -> nn.Module:
            """The nearest module above ``module`` called exactly once (a Sequential or
            ModuleList that is never called itself, or a module called twice, is passed)."""
            p = parent.get(id(module), model)
            while p is not model and (id(p) not in calls or calls[id(p)].count != 1):
                p = parent.get(id(p), model)
            return p

        scope = {id(root): enclosing(root) for _, root in roots}
        pending = list(roots)
        traced: dict[int, Graph | Exception] = {}
        covered: set[int] = set()
        while pending:
            outer = _outermost({id(scope[id(r)]): scope[id(r)] for _, r in pending}, parent, model)
            for _, r in pending:
                s = scope[id(r)]
                while id(s) not in outer:
                    s = parent.get(id(s), model)
                scope[id(r)] = s
            escalated = []
            for name, root in pending:
                if id(root) in covered:
                    continue
                where = scope[id(root)]
                graph = traced.get(id(where))
                if graph is None:
                    graph = traced[id(where)] = _trace(model, where, inputs, calls, names)
                if isinstance(graph, Exception):
                    if where is not model:  # try the next module up: torch-pruning may read a larger graph
                        scope[id(root)] = enclosing(where)
                        escalated.append((name, root))
                    elif enclosing(root) is model:  # the layer's own first trace: a real failure
                        raise graph
                    else:
                        found.skipped.append(
                            f"{name}: its channels leave {names[id(enclosing(root))]}, and tracing the whole model failed ({type(graph).__name__}: {graph})"
                        )
                    continue
                if root not in graph.dg.module2node:  # never called on the example inputs
                    covered.add(id(root))
                    found.skipped.append(f"{name}: not used by the forward pass on the example inputs")
                    continue
                read = read_group(graph, name, root, chosen)
                if read.boundary is not None and where is not model:
                    scope[id(root)] = enclosing(where)
                    escalated.append((name, root))
                    continue
                covered.update(id(m.module) for m in read.group.producers)
                covered.add(id(root))
                if read.boundary == "output":
                    found.skipped.append(f"{name}: its channels reach the model's output")
                elif read.boundary == "input":
                    found.skipped.append(f"{name}: its channels meet one of the model's inputs (e.g. a residual add on an input)")
                elif read.outsiders:
                    found.skipped.append(f"{name}: " + listing("its channels are shared with layers the step does not select", read.outsiders))
                elif read.unsupported:
                    found.unsupported.append(f"the group of {name} holds " + listing("layers that cannot be masked per channel", read.unsupported))
                else:
                    found.groups.append(read.group)
            pending = escalated
    return found


def _outermost(scopes: dict[int, nn.Module], parent: dict[int, nn.Module], model: nn.Module) -> set[int]:
    """Of ``scopes``, those with no other of them above (an enclosing scope takes in the inner ones)."""
    out = set()
    for key, module in scopes.items():
        p = parent.get(id(module))
        inner = False
        while p is not None:
            if id(p) in scopes:
                inner = True
                break
            p = parent.get(id(p))
        if not inner:
            out.add(key)
    return out


def _trace(model: nn.Module, scope: nn.Module, inputs: Sequence[torch.Tensor], calls: dict[int, _Call], names: dict[int, str]) -> Graph | Exception:
    try:
        if scope is model:
            return trace(model, inputs, names=names, whole_model=True)
        call = calls[id(scope)]
        return trace(scope, call.args, call.kwargs, names=names, whole_model=False)
    except (TimeLimitExceeded, KeyboardInterrupt):
        raise
    except Exception as exc:
        return exc
