"""safetensors files tensor by tensor: a reader over ``safetensors.safe_open`` (one file, a shard
index or a Hugging Face model folder) and a writer that puts the header first and then each
tensor's bytes in order, so no more than one tensor need be in memory at a time; a thread that
writes while the next tensor is made, and two reused buffers to make them in.

The format: an 8-byte little-endian header length, a JSON header (``dtype``, ``shape`` and
``data_offsets`` per tensor, and an optional ``__metadata__`` of strings) padded with spaces to a
multiple of 8, then the raw data in the header's order. ``safe_open`` memory-maps a file: a
tensor it gives is a view of the map (page cache, not the process's own memory) until it is
copied, and is never written to here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO, NamedTuple

import torch

from ..checkpoint.read import SAFETENSORS_SUFFIX, TIED_METADATA, read_index, suffix_of, utf8_path, weights_file
from ..errors import CheckpointError, problem
from ..text import clip, listing
from .direct import DirectFile

#: torch dtype -> the safetensors name of it
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_BY_NAME = {v: k for k, v in DTYPES.items()}


def _fail(path: str, message: str, code: str = "checkpoint") -> CheckpointError:
    return CheckpointError(problem(message, source=path, code=code))


def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


class Stored(NamedTuple):
    """Where a tensor of a checkpoint lies, and what it is."""

    file: int  # index into Source.files
    key: str  # its name in that file
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


class Source:
    """A safetensors checkpoint read tensor by tensor.

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json`` shard index, or a model
            folder holding either.

    Raises:
        CheckpointError: missing or unreadable files, a folder or index without safetensors
            weights (``.bin``/``.pt`` checkpoints cannot be streamed), an index naming tensors
            its shards lack.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.lexists(path):
            raise _fail(path, "no such file or folder")
        if os.path.isdir(path):
            found = weights_file(path)
            if found is None or not (found.endswith(SAFETENSORS_SUFFIX) or found.endswith(SAFETENSORS_SUFFIX + ".index.json")):
                raise _fail(path, "has no safetensors weights (model.safetensors or its shard index); --stream reads safetensors only")
            path = found
        self.files: list[str] = []
        self.tensors: dict[str, Stored] = {}
        self.metadata: list[dict[str, str]] = []
        self._handles: list[Any] = []
        if path.endswith(".index.json"):
            weight_map, shards = read_index(path)
            folder = os.path.dirname(os.path.abspath(path))
            for shard in shards:
                if suffix_of(shard) != SAFETENSORS_SUFFIX:
                    raise _fail(path, f"shard {clip(shard, 60)!r} is not a .safetensors file; --stream reads safetensors only")
                self._open(os.path.join(folder, shard), prefer=weight_map)
            missing = [k for k in weight_map if k not in self.tensors]
            if missing:
                raise _fail(path, listing("the index names tensors its shards lack", missing))
        elif suffix_of(path) == SAFETENSORS_SUFFIX:
            self._open(path, prefer=None)
        else:
            raise _fail(
                path,
                f"{suffix_of(path) or '(no suffix)'!r} files cannot be streamed; --stream reads .safetensors files, shard indexes and model folders",
            )

    def _open(self, path: str, prefer: Mapping[str, str] | None) -> None:
        try:
            from safetensors import safe_open
        except ImportError:
            raise _fail(path, "reading .safetensors needs the 'safetensors' package: pip install 'prunerecipe[hf]'") from None
        index = len(self.files)
        try:
            with utf8_path(path) as openable:
                handle = safe_open(openable, "pt", device="cpu")
            found = {}
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                part = handle.get_slice(key)
                name = part.get_dtype()
                if name not in _BY_NAME:
                    raise ValueError(f"tensor {key!r} has dtype {name}, which prunerecipe does not read")
                found[key] = Stored(index, key, _BY_NAME[name], tuple(part.get_shape()))
            meta = dict(handle.metadata() or {})
        except Exception as exc:
            raise _fail(path, f"not a readable safetensors file ({type(exc).__name__}: {clip(str(exc), 120)})") from exc
        self.files.append(path)
        self.metadata.append(meta)
        self._handles.append(handle)
        shard = os.path.basename(path)
        twice = [
            f"{key} ({os.path.basename(self.files[self.tensors[key].file])}, {shard})" for key in found if key in self.tensors and prefer is not None
        ]
        if twice:  # as in memory: loaders disagree on which copy wins
            raise _fail(path, listing("tensors stored in two shards", twice))
        for key, stored in found.items():
            if key not in self.tensors:
                self.tensors[key] = stored
        tied = meta.get(TIED_METADATA)
        if tied:
            try:
                for alias, kept in json.loads(tied).items():
                    if kept in found and alias not in self.tensors:
                        self.tensors[alias] = found[kept]
            except (ValueError, AttributeError):
                raise _fail(path, f"its {TIED_METADATA!r} metadata is not valid") from None

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``: a view of the file's memory map (read as it is used; never write to it)."""
        stored = self.tensors[name]
        try:
            return self._handles[stored.file].get_tensor(stored.key)
        except Exception as exc:
            raise _fail(self.files[stored.file], f"cannot read tensor {name!r} ({type(exc).__name__}: {clip(str(exc), 120)})") from exc

    def shapes(self) -> dict[str, torch.Tensor]:
        """``{name: meta tensor}``: every tensor's dtype and shape, no data (for fit checks)."""
        return {name: torch.empty(s.shape, dtype=s.dtype, device="meta") for name, s in self.tensors.items()}

    @property
    def size(self) -> int:
        """Bytes of tensor data over all files."""
        return sum(os.path.getsize(f) for f in self.files)

    def close(self) -> None:
        self._handles = []


def _header(
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None, names: Mapping[str, str] | None = None
) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        size = nbytes(dtype, shape)
        header[names.get(name, name) if names else name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    return json.dumps(header, separators=(",", ":")).encode()


class Writer:
    """A safetensors file written tensor by tensor, in the order of ``entries``.

    The header is written first; the ``__metadata__``, which may only be known at the end (a
    summary of what was written), gets ``room`` (metadata at least as long as the final one,
    e.g. with every number at its widest) and is rewritten in place by :meth:`finish`.

    Args:
        fh: the file, open for writing and positioned at 0 (a :class:`~.direct.DirectFile`
            is held the header's blocks, which are rewritten at the end).
        entries: ``(name, dtype, shape)`` of every tensor, in the order they will be written.
        room: metadata as long as the final metadata can be (None: no metadata).
        names: the name each entry is stored under in the file, where it differs from its name
            here (a Hugging Face folder stores checkpoint names).
    """

    def __init__(
        self,
        fh: BinaryIO | DirectFile,
        entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        room: Mapping[str, str] | None = None,
        names: Mapping[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise RuntimeError("writing safetensors tensor by tensor needs a little-endian machine")
        unknown = [f"{name} ({dtype})" for name, dtype, _ in entries if dtype not in DTYPES]
        if unknown:
            raise ValueError(listing("safetensors has no dtype for", unknown))
        self.fh = fh
        self.entries = list(entries)
        self.names = dict(names or {})
        self._next = 0
        self._room = len(_header(self.entries, room, self.names))
        self._room += -(8 + self._room) % 8
        keep = getattr(fh, "keep_head", None)  # a direct-I/O file holds the header until it is final
        if keep is not None:
            keep(8 + self._room)
        fh.write(self._room.to_bytes(8, "little"))
        fh.write(_header(self.entries, room, self.names).ljust(self._room, b" "))
        self.data_start = 8 + self._room

    @property
    def pending(self) -> str | None:
        """The name of the next tensor to write (None: all were written)."""
        return self.entries[self._next][0] if self._next < len(self.entries) else None

    @property
    def written(self) -> int:
        """How many tensors were written."""
        return self._next

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes: it must be the next entry, with that dtype and shape."""
        if self._next >= len(self.entries):
            raise ValueError(f"expected no more tensors, got {name}")
        want, dtype, shape = self.entries[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"expected {want} {dtype} {tuple(shape)} next, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        flat = tensor.detach().reshape(-1)
        if not flat.is_contiguous():  # pragma: no cover - reshape(-1) gives a contiguous tensor or a copy
            flat = flat.contiguous()
        if flat.numel():
            raw = flat.view(torch.uint8)
            if isinstance(self.fh, DirectFile):
                self.fh.write(raw)  # copied straight into its block buffer
            else:
                self.fh.write(raw.numpy().data)
        self._next += 1

    def finish(self, metadata: Mapping[str, str] | None = None) -> None:
        """Check every tensor was written, and put the final metadata in the header."""
        if self._next != len(self.entries):
            raise ValueError(f"{len(self.entries) - self._next} tensor(s) were not written")
        header = _header(self.entries, metadata, self.names)
        if len(header) > self._room:
            raise ValueError(f"the final metadata needs {len(header)} header bytes; {self._room} were set aside")
        self.fh.flush()
        self.fh.seek(8)
        self.fh.write(header.ljust(self._room, b" "))
        self.fh.seek(0, os.SEEK_END)
        self.fh.flush()


def entries_in_file_order(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Wider dtypes first (as ``safetensors.save_file`` lays them out), else in the given order: every
    tensor's data then starts at a multiple of its element size."""
    return sorted(entries, key=lambda e: -torch.empty((), dtype=e[1]).element_size())


class Pipe:
    """Writes one tensor at a time in a thread (the next is made meanwhile); :meth:`wait` raises
    what the write raised. ``writing`` is the tensor being written."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.writing: torch.Tensor | None = None

    def put(self, writer: Writer, name: str, tensor: torch.Tensor) -> None:
        self.wait()
        self.writing = tensor

        def work() -> None:
            try:
                writer.write(name, tensor)
            except BaseException as exc:  # handed to the main thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=work, name="prunerecipe-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.writing = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class Buffers:
    """Two reused buffers for folded tensors: one is written while the other is filled."""

    def __init__(self, pipe: Pipe) -> None:
        self._bufs: list[torch.Tensor] = []
        self._turn = 0
        self._pipe = pipe

    def take(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of that dtype and shape in the next buffer (grown when too small)."""
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self._turn = 1 - self._turn
        while len(self._bufs) <= self._turn:
            self._bufs.append(torch.empty(0, dtype=torch.uint8))
        writing = self._pipe.writing
        if writing is not None and writing.untyped_storage().data_ptr() == self._bufs[self._turn].untyped_storage().data_ptr():
            self._pipe.wait()  # that buffer is still being written
        if self._bufs[self._turn].numel() < size:
            self._bufs[self._turn] = torch.empty(0, dtype=torch.uint8)  # the old one goes first
            self._bufs[self._turn] = torch.empty(size, dtype=torch.uint8)
        return self._bufs[self._turn][:size].view(dtype).view(shape)

    def release(self) -> None:
        """Give both buffers back (the writer must be idle): a re-parametrized tensor needs the
        room; they are allocated again by the next fold."""
        self._bufs = []
