"""Calibration data: the function a spec names, the samples it yields, checked and batched.

A calibration function is named like a model (``pkg.mod:fn`` or ``file.py:fn``) and returns an
iterable of samples, each a tensor (token ids of shape ``(seq_len,)``, say) or a dict of
tensors (``{"input_ids": ..., "attention_mask": ...}``), without a batch dimension. It may take
``model`` and ``samples`` keyword parameters; prunerecipe passes those it declares. The first
``calibration.samples`` samples are taken and stacked ``calibration.batch_size`` at a time;
everything is checked before the model is touched.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, KeyPath
from ..modelspec import load_object
from ..spec import Calibration, Recipe
from ..text import short

#: one batch, as the model is called with it: ``model(batch)`` or ``model(**batch)``
Batch = torch.Tensor | dict[str, torch.Tensor]

_PASSED = ("model", "samples")


def load_calibration(spec: str) -> Callable[..., Any]:
    """The calibration function a spec names.

    Args:
        spec: ``pkg.module:fn`` or ``path/to/file.py:fn``.

    Returns:
        The function (or any callable).

    Raises:
        CalibrationError: the spec does not import, or names something that is not callable.

    Example:
        >>> fn = load_calibration("prunerecipe.calibrate.data:load_calibration")
        >>> fn is load_calibration
        True
    """
    obj = load_object(spec, what="calibration spec", error=CalibrationError)
    if not callable(obj):
        raise CalibrationError(f"calibration spec {spec!r}: is a {type(obj).__name__}, not a function returning calibration samples")
    return obj


def call_calibration(fn: Callable[..., Any], *, model: nn.Module, samples: int, spec: str = "") -> Any:
    """Call a calibration function with the keyword arguments it declares (``model``, ``samples``).

    Args:
        fn: the function.
        model: the model being pruned.
        samples: how many samples the recipe draws.
        spec: how messages name the function.

    Returns:
        What the function returned (checked later by :func:`draw_batches`).

    Raises:
        CalibrationError: the function needs other arguments, or raised.

    Example:
        >>> call_calibration(lambda samples: [torch.ones(2)] * samples, model=nn.Identity(), samples=3)[0]
        tensor([1., 1.])
    """
    name = spec or getattr(fn, "__qualname__", repr(fn))
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    needed = [p for p, v in params.items() if v.default is v.empty and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD) and p not in _PASSED]
    if needed:
        raise CalibrationError(f"calibration function {name}: needs argument(s) {', '.join(needed)}; it may take none, or model= and samples= only")
    kwargs = {key: value for key, value in (("model", model), ("samples", samples)) if key in params}
    try:
        result = fn(**kwargs)
    except Exception as exc:
        raise CalibrationError(f"calibration function {name}: raised {type(exc).__name__}: {exc}") from exc
    if result is None:
        raise CalibrationError(f"calibration function {name}: returned None; it returns (or yields) the samples")
    return result


class LazySamples:
    """A calibration function's samples, asked for only when a step reads them (a recipe that
    needs no data does not call it): ``draw_batches`` calls :meth:`resolve` and checks what it gives."""

    def __init__(self, fn: Callable[..., Any], *, model: nn.Module, samples: int, spec: str = "") -> None:
        self.fn, self.model, self.samples, self.spec = fn, model, samples, spec

    def resolve(self) -> Any:
        """What the function returns (see :func:`call_calibration`)."""
        return call_calibration(self.fn, model=self.model, samples=self.samples, spec=self.spec)


def draw_batches(data: Any, recipe: Recipe, where: KeyPath, model: nn.Module | None = None) -> tuple[list[Batch], int]:
    """The first ``samples`` samples of ``data``, checked and stacked into batches.

    Args:
        data: an iterable of samples (a tensor's rows count as samples too).
        recipe: gives ``calibration: {samples, batch_size}`` and locates messages.
        where: the key path problems are reported at.
        model: the model the data is for: a Hugging Face model that takes ``input_ids`` gets
            its samples checked to be token ids of shape ``(seq_len,)`` (with any mask of that
            length), since a batched or otherwise shaped sample runs but computes the wrong thing.

    Returns:
        ``(batches, samples drawn)``; fewer samples than asked for when the data runs out.

    Raises:
        CalibrationError: empty data, a sample of the wrong type, an empty or 0-d tensor,
            NaN or inf, samples of one batch with different shapes or keys, or an iterable
            that raised.
    """
    settings = recipe.calibration or Calibration()

    def fail(message: str) -> CalibrationError:
        return CalibrationError(recipe.problem(where, message, code="calibration"))

    if isinstance(data, LazySamples):
        try:
            data = data.resolve()
        except CalibrationError as exc:  # the function's own failure: located at the data's key
            raise fail("; ".join(p.message for p in exc.problems)) from None

    if isinstance(data, Mapping):
        raise fail("calibration data is one dict; give an iterable of samples (a list of dicts, say)")
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise fail(f"calibration data is {short(data)} (a {type(data).__name__}), not an iterable of samples (tensors or dicts of tensors)")
    taken: list[Batch] = []
    try:
        for i, item in enumerate(itertools.islice(iter(data), settings.samples)):
            taken.append(_checked(item, i, fail))
    except CalibrationError as exc:
        if all(p.path is None for p in exc.problems):  # the calibration function's own: located at the data's key
            raise fail("; ".join(p.message for p in exc.problems)) from None
        raise
    except Exception as exc:
        raise fail(f"reading calibration sample {len(taken)} raised {type(exc).__name__}: {exc}") from exc
    if not taken:
        raise fail("calibration data is empty: it yielded no sample")
    batches = [_stack(taken, start, settings.batch_size, fail) for start in range(0, len(taken), settings.batch_size)]
    if model is not None and getattr(model, "main_input_name", None) == "input_ids" and hasattr(getattr(model, "config", None), "to_dict"):
        get = getattr(model, "get_input_embeddings", None)
        vocab = getattr(get(), "num_embeddings", None) if callable(get) else None
        for i, item in enumerate(taken):
            _token_sample(item, i, fail, vocab if isinstance(vocab, int) else None)
    return batches, len(taken)


def _checked(item: Any, index: int, fail: Callable[[str], CalibrationError]) -> Batch:
    what = f"calibration sample {index}"
    if isinstance(item, torch.Tensor):
        return _checked_tensor(item, what, fail)
    if isinstance(item, Mapping):
        if not item:
            raise fail(f"{what} is an empty dict")
        out = {}
        for key, value in item.items():
            if not isinstance(key, str):
                raise fail(f"{what} has the key {short(key)}; keys are the model's argument names (strings)")
            if not isinstance(value, torch.Tensor):
                raise fail(f"{what}[{key!r}] is a {type(value).__name__}, not a tensor")
            out[key] = _checked_tensor(value, f"{what}[{key!r}]", fail)
        return out
    raise fail(f"{what} is a {type(item).__name__}; each sample is a tensor or a dict of tensors")


def _token_sample(item: Batch, index: int, fail: Callable[[str], CalibrationError], vocab: int | None = None) -> None:
    """A language model's sample: token ids ``(seq_len,)`` in ``range(vocab)``, int64 or int32
    (what an embedding takes), and other entries of that length."""
    what = f"calibration sample {index}"
    ids = item if isinstance(item, torch.Tensor) else item.get("input_ids")
    if ids is None:
        raise fail(f"{what} has no 'input_ids' (keys: {', '.join(sorted(item))}); the model takes token ids")
    where = what if isinstance(item, torch.Tensor) else f"{what}['input_ids']"
    if ids.dim() != 1:
        extra = " (no batch dimension: batch_size stacks samples)" if ids.dim() == 2 else ""
        raise fail(f"{where} has shape {tuple(ids.shape)}; the model takes token ids, one sample of shape (seq_len,){extra}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise fail(f"{where} is {str(ids.dtype).replace('torch.', '')}; token ids are integers")
    if ids.dtype not in (torch.int64, torch.int32):
        raise fail(f"{where} is {str(ids.dtype).replace('torch.', '')}; token ids are int64 (or int32), as an embedding takes them")
    if ids.numel() and vocab is not None:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise fail(f"{where} holds the token id {bad}; the model's vocabulary has ids 0 to {vocab - 1}")
    if isinstance(item, dict):
        # an encoder-decoder's decoder_* entries go with decoder_input_ids, whose length is its own
        decoder = item.get("decoder_input_ids")
        for key, value in item.items():
            if key in ("input_ids", "decoder_input_ids") or value.dim() < 1:
                continue
            owner, name = (decoder, "decoder_input_ids") if key.startswith("decoder_") and decoder is not None else (ids, "input_ids")
            if owner.dim() >= 1 and value.shape[0] != owner.shape[0]:
                raise fail(f"{what}[{key!r}] has shape {tuple(value.shape)}, its {name} {tuple(owner.shape)}: they must have one length")


def _checked_tensor(t: torch.Tensor, what: str, fail: Callable[[str], CalibrationError]) -> torch.Tensor:
    if t.dim() == 0:
        raise fail(f"{what} is a 0-dimensional tensor; a sample has at least one dimension (token ids: (seq_len,)), and no batch dimension")
    if t.numel() == 0:
        raise fail(f"{what} is empty (shape {tuple(t.shape)})")
    if t.is_complex():
        raise fail(f"{what} is {str(t.dtype).replace('torch.', '')}; samples are real (token ids, or float inputs)")
    if t.is_floating_point() or t.is_complex():
        bad = int((~torch.isfinite(t)).sum().item())
        if bad:
            nan = int(torch.isnan(t).sum().item())
            raise fail(f"{what} has {nan} NaN and {bad - nan} infinite values")
    return t.detach()


def _stack(taken: list[Batch], start: int, size: int, fail: Callable[[str], CalibrationError]) -> Batch:
    part = taken[start : start + size]
    first = part[0]
    for offset, item in enumerate(part[1:], 1):
        i = start + offset
        if isinstance(first, torch.Tensor) != isinstance(item, torch.Tensor):
            raise fail(f"calibration sample {i} is a {type(item).__name__}, sample {start} a {type(first).__name__}; give one kind")
        if isinstance(first, dict) and isinstance(item, dict) and set(first) != set(item):
            raise fail(f"calibration sample {i} has the keys {sorted(item)}, sample {start} {sorted(first)}; give every sample the same keys")
        for key, a, b in _pairs(first, item):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise fail(
                    f"calibration sample {i}{key} is {_kind(b)}, sample {start}{key} {_kind(a)}: samples stacked into one batch "
                    f"(batch_size {size}) need one shape and dtype (cut or pad them to one length)"
                )
    if isinstance(first, torch.Tensor):
        return torch.stack([t for t in part if isinstance(t, torch.Tensor)])
    return {key: torch.stack([item[key] for item in part if isinstance(item, dict)]) for key in first}


def _pairs(a: Batch, b: Batch) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [("", a, b)]
    assert isinstance(a, dict) and isinstance(b, dict)
    return [(f"[{key!r}]", a[key], b[key]) for key in a]


def _kind(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """``batch`` on ``device`` (a no-op when it is there already)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {key: value.to(device) for key, value in batch.items()}
