"""Reading and writing state_dicts, and restoring pruned checkpoints into fresh models."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .structured.record import shrunk_to_fit
from .text import listing
from .torchprune import MASK, ORIG, ModelSnapshot, has_param, is_pruned, make_copyable, pruned_keys, pruning_hooks, refresh, restore_mask

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _check_suffix(path: str) -> str:
    suffix = _suffix(path)
    if suffix not in TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,):
        raise CheckpointError(f"{path}: unsupported checkpoint type {suffix or '(no suffix)'!r}; use .pt, .pth, .bin or .safetensors")
    return suffix


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state_dict from ``.pt/.pth/.bin`` (``torch.load(weights_only=True)`` only) or ``.safetensors``.

    Args:
        path: the checkpoint file.

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        CheckpointError: missing, truncated, tampered or code-carrying files, or no state_dict inside.

    Example:
        >>> state = read_state_dict("lenet-pruned.pt")  # doctest: +SKIP

    A ``{"state_dict": {...}}`` wrapper (as Lightning writes) is unwrapped. Raises
    :class:`CheckpointError` for missing, truncated, tampered or code-carrying files.
    """
    path = os.fspath(path)
    suffix = _check_suffix(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint")
    if suffix == SAFETENSORS_SUFFIX:
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path}: reading .safetensors needs the 'safetensors' package: pip install 'prunerecipe[safetensors]'") from None
        try:
            data: Any = load_file(path, device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            text = str(exc)
            # torch's message is long; its one informative line follows "WeightsUnpickler error:"
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            informative = [line for line in lines if "Unsupported" in line or "GLOBAL" in line]
            first = (informative or lines or [type(exc).__name__])[0]
            if "Unsupported global" in text or "GLOBAL" in text:  # a reference to code: refused, never run
                raise CheckpointError(
                    f"{path}: refused to load: the file holds more than tensors and plain containers "
                    f"(torch.load weights_only=True rejected it: {first}). Nothing in it was run."
                ) from exc
            raise CheckpointError(f"{path}: not a readable torch checkpoint, perhaps truncated or corrupted ({first})") from exc
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{path}: not a readable torch checkpoint, perhaps truncated or corrupted ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
    return _as_state_dict(data, path)


def _as_state_dict(data: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(data, Mapping) and not _all_tensors(data):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = data.get(key)
            if isinstance(inner, Mapping) and _all_tensors(inner):
                return _check_values(dict(inner), path)
    if isinstance(data, Mapping) and _all_tensors(data):
        return _check_values(dict(data), path)
    raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a state_dict (a mapping of names to tensors)")


def _all_tensors(data: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())


def _check_values(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    empty = [k for k, v in state.items() if v.device.type == "meta"]
    if empty:
        raise CheckpointError(f"{path}: {listing('tensors without data (meta device)', empty)}")
    return state


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write a state_dict atomically: a temp file beside ``path``, then a rename.

    Args:
        state_dict: what to write (tensors are detached; tied tensors are stored once each).
        path: ``.pt``/``.pth``/``.bin`` (``torch.save``) or ``.safetensors``.
        force: replace an existing file; without it an existing file is an error.

    Returns:
        None.

    Raises:
        CheckpointError: the file exists (without ``force``), the folder is missing, or the
            suffix is unknown. A failed write leaves no partial file.

    Example:
        >>> save_state_dict(model.state_dict(), "pruned.pt", force=True)  # doctest: +SKIP
    """
    path = os.fspath(path)
    suffix = _check_suffix(path)
    if os.path.exists(path) and not force:
        raise CheckpointError(f"{path}: already exists; refusing to overwrite it (use --force)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path}: folder {folder} does not exist")
    tensors = {k: v.detach() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            if suffix == SAFETENSORS_SUFFIX:
                try:
                    from safetensors.torch import save
                except ImportError:
                    raise CheckpointError("writing .safetensors needs the 'safetensors' package: pip install 'prunerecipe[safetensors]'") from None
                fh.write(save(_unshared(tensors)))
            else:
                torch.save(tensors, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: no clobbering, even in a race
            except FileExistsError:
                raise CheckpointError(f"{path}: already exists; refusing to overwrite it (use --force)") from None
            except OSError:
                if os.path.exists(path):
                    raise CheckpointError(f"{path}: already exists; refusing to overwrite it (use --force)") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied weights): give each its own contiguous copy."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        out[key] = value.contiguous().clone() if ptr in seen or not value.is_contiguous() else value
        if ptr != -1:
            seen.add(ptr)
    return out


def strip_data_parallel_prefix(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """Drop the ``module.`` prefix that DataParallel/DDP checkpoints carry, when the model lacks it."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys) and not any(k.startswith("module.") for k in model.state_dict()):
        return {k[len("module.") :]: v for k, v in state_dict.items()}, True
    return dict(state_dict), False


def load_pruned_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a checkpoint into ``model`` in place, restoring pruning where it carries ``*_orig``/``*_mask``.

    Each pruned parameter gets torch's re-parametrization back (a ``CustomFromMask``
    hook holding the saved mask), so pruning can go on: a recipe applied next chains
    onto it. A ``module.`` (DataParallel/DDP) prefix is dropped. Keys, shapes and values
    are checked and converted before anything changes; on any mismatch the model is left
    as it was.

    Args:
        model: the model to load into, in place.
        state_dict: a plain or pruned (``*_orig``/``*_mask``) state_dict.

    Returns:
        The qualified names whose pruning was restored.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped keys, or masks that are not 0/1.

    Example:
        >>> load_pruned_state_dict(LeNet(), read_state_dict("pruned.pt"))  # doctest: +SKIP
        ['conv1.weight', 'conv1.bias']
    """
    with shrunk_to_fit(model, state_dict):  # a compacted checkpoint shrinks the fresh model first; undone if loading fails
        return _load_pruned(model, state_dict)


def _load_pruned(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    state_dict, _ = strip_data_parallel_prefix(state_dict, model)
    # Every name a module is registered under: state_dict() lists a shared module under each.
    names_of: dict[int, list[str]] = {}
    modules: dict[str, nn.Module] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        modules[mod_name] = module
        names_of.setdefault(id(module), []).append(mod_name)

    restored = pruned_keys(state_dict)
    to_prune: dict[tuple[int, str], tuple[nn.Module, str, str]] = {}
    problems: list[str] = []
    for qual in restored:
        mod_name, _, pname = qual.rpartition(".")
        module = modules.get(mod_name)
        if module is None or not has_param(module, pname):
            problems.append(f"{qual}{ORIG}: the model has no parameter {qual}")
            continue
        if not is_pruned(module, pname):
            to_prune.setdefault((id(module), pname), (module, pname, qual))

    expected = dict(model.state_dict())
    for module, pname, _ in to_prune.values():
        for prefix in names_of[id(module)]:
            qual = f"{prefix}.{pname}" if prefix else pname
            tensor = expected.pop(qual)
            expected[qual + ORIG] = tensor
            expected[qual + MASK] = tensor
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    soft = [
        k
        for k in state_dict
        if k.endswith(MASK)
        and k[: -len(MASK)] in restored
        and state_dict[k].device.type != "meta"
        and not bool(((state_dict[k] == 0) | (state_dict[k] == 1)).all())
    ]
    if soft:
        problems.append(listing("masks must hold only 0 and 1 (tampered or not a pruning mask)", soft))
    if missing:
        problems.append(listing("missing from the checkpoint", missing))
    if unexpected:
        problems.append(listing("not in the model", unexpected))
    if shapes:
        problems.append(listing("shape mismatch", shapes))
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(problems))

    # Convert every value to what it will land in before touching the model, so that the
    # in-place copies below cannot fail halfway (meta tensors, impossible dtypes...).
    ready: dict[str, torch.Tensor] = {}
    bad = []
    for key, value in state_dict.items():
        target = expected[key]
        try:
            if value.device.type == "meta":
                raise ValueError("it is a meta tensor (no data)")
            ready[key] = value.to(
                device=target.device if target.device.type != "meta" else "cpu", dtype=target.dtype if not key.endswith(MASK) else value.dtype
            )
        except Exception as exc:
            bad.append(f"{key}: {exc}")
    if bad:
        raise CheckpointError("checkpoint does not fit the model: " + listing("unusable values", bad))

    snapshot = ModelSnapshot(list({id(m): m for m in modules.values()}.values()))
    try:
        for module, pname, _ in to_prune.values():
            mask = next(ready[f"{p}.{pname}{MASK}" if p else f"{pname}{MASK}"] for p in names_of[id(module)])
            restore_mask(module, pname, mask)
        with torch.no_grad():
            model.load_state_dict(ready, strict=True)
        for module in modules.values():  # refresh `weight` = orig * mask from the loaded values
            refresh(module)
            if pruning_hooks(module):
                make_copyable(module)
    except Exception as exc:
        snapshot.restore()
        raise CheckpointError(f"checkpoint does not fit the model: {type(exc).__name__}: {exc}") from exc
    return restored


def state_dict_sparsity(state_dict: Mapping[str, torch.Tensor], names: list[str] | None = None) -> list[tuple[str, tuple[int, ...], int, bool]]:
    """``(name, shape, zero entries, masked?)`` per floating-point tensor, ``X_orig * X_mask`` folded into ``X``.

    ``names`` restricts (and orders) the rows, e.g. to a model's parameter names.
    """
    masked = set(pruned_keys(state_dict))
    rows: dict[str, tuple[str, tuple[int, ...], int, bool]] = {}
    for key, value in state_dict.items():
        if key.endswith(MASK) and key[: -len(MASK)] in masked:
            continue
        name, is_masked = (key[: -len(ORIG)], True) if key.endswith(ORIG) and key[: -len(ORIG)] in masked else (key, False)
        if not value.is_floating_point() and not is_masked:
            continue
        if is_masked:
            alive = torch.count_nonzero(torch.logical_and(value != 0, state_dict[name + MASK] != 0)).item()
        else:
            alive = torch.count_nonzero(value).item()
        rows[name] = (name, tuple(value.shape), int(value.numel() - alive), is_masked)
    if names is not None:
        return [rows[n] for n in names if n in rows]
    return list(rows.values())
