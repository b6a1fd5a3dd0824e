"""An output file written front to back with direct I/O (``O_DIRECT``), past the page cache.

A streaming run writes a checkpoint as large as the input, often larger than the memory: written
through the page cache, every byte is first copied into a newly allocated cache page (most of a
plain copy's time), and the output evicts everything else the cache held (the input's pages
among them). Direct I/O hands aligned blocks to the disk from one reused buffer instead.

It needs block-aligned offsets, sizes and memory, so the bytes go through a page-aligned
staging buffer written in whole blocks; the first blocks (the safetensors header, rewritten at
the end with the final metadata) are held in memory until :meth:`DirectFile.close`, which also
writes the last partial block padded and truncates the file to its length. Where direct I/O is
not available (no ``O_DIRECT`` on the platform, a file system that refuses it: tmpfs, some
network file systems), the same file is written through the page cache as usual.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os

import torch

ALIGN = 4096  # the largest logical block size in common use: aligned for every disk
STAGE = 16 << 20  # bytes per direct write


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _bytes_of(data: bytes | bytearray | memoryview | torch.Tensor) -> torch.Tensor:
    """``data`` as a flat uint8 tensor (a view where it can be; read-only buffers, the header's
    few bytes, are copied)."""
    if isinstance(data, torch.Tensor):
        return data.detach().reshape(-1).view(torch.uint8)
    view = memoryview(data).cast("B")
    if not len(view):
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(view) if view.readonly else view, dtype=torch.uint8)


class DirectFile:
    """A write-only binary file for :class:`~.format.Writer`: appends, and rewrites of the
    first ``keep_head`` bytes until :meth:`close`.

    Args:
        path: the file to create (truncated when it exists), with the mode ``open()`` gives.
    """

    def __init__(self, path: str) -> None:
        direct = getattr(os, "O_DIRECT", 0)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.fd = -1
        self.direct = False
        if direct:
            try:
                self.fd = os.open(path, flags | direct, 0o666)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # the file system refuses direct I/O: buffered below
                    raise
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o666)
        self._stage = mmap.mmap(-1, STAGE)  # page-aligned, as direct I/O needs
        self._view = torch.frombuffer(self._stage, dtype=torch.uint8)
        self._head = torch.zeros(0, dtype=torch.uint8)  # bytes [0, len(head)), written by close()
        self._head_map: mmap.mmap | None = None
        self.flushed = 0  # bytes of the file on disk, from the end of the head (a multiple of ALIGN)
        self.size = 0  # bytes written so far (the file's length at close)
        self.cursor = 0  # where the next write goes
        self.closed = False

    def keep_head(self, nbytes: int) -> None:
        """Hold the first ``nbytes`` (rounded up to whole blocks) in memory until :meth:`close`,
        so they can be rewritten after the rest; call it before the first write."""
        if self.size:
            raise ValueError("keep_head() must come before the first write")
        self._head_map = mmap.mmap(-1, max(ALIGN, _aligned(nbytes)))
        self._head = torch.frombuffer(self._head_map, dtype=torch.uint8)
        self.flushed = len(self._head)

    def write(self, data: bytes | bytearray | memoryview | torch.Tensor) -> int:
        """Append ``data`` (or rewrite bytes inside the held head, after a :meth:`seek`)."""
        src = _bytes_of(data)
        n = len(src)
        if self.cursor != self.size:  # a rewrite: only inside the head
            if self.cursor + n > len(self._head):
                raise OSError(errno.ESPIPE, "a direct-I/O file can only rewrite its held head")
            self._head[self.cursor : self.cursor + n] = src
            self.cursor += n
            return n
        done = 0
        if self.size < len(self._head):
            k = min(n, len(self._head) - self.size)
            self._head[self.size : self.size + k] = src[:k]
            done = k
            self.size += k
        while done < n:
            at = self.size - self.flushed  # where in the stage
            k = min(n - done, STAGE - at)
            self._view[at : at + k].copy_(src[done : done + k])  # (torch lets go of the GIL here)
            done += k
            self.size += k
            if at + k == STAGE:
                self._pwrite(memoryview(self._stage), self.flushed)
                self.flushed += STAGE
        self.cursor = self.size
        return n

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        while len(buf):
            try:
                wrote = os.pwrite(self.fd, buf, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()  # direct I/O refused at the first write: the page cache, then
                continue
            buf = buf[wrote:]
            offset += wrote

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move where the next write goes: into the held head, or back to the end."""
        target = offset if whence == os.SEEK_SET else self.size + offset if whence == os.SEEK_END else self.cursor + offset
        if not (0 <= target <= self.size):
            raise OSError(errno.EINVAL, f"cannot seek to {target} in a file of {self.size} bytes")
        self.cursor = target
        return target

    def tell(self) -> int:
        return self.cursor

    def flush(self) -> None:
        """Nothing to do: the blocks not yet written are written by :meth:`close`."""

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Write the head and the last partial block (padded to a whole block), cut the file
        to its length, and close it."""
        if self.closed:
            return
        self.closed = True
        try:
            tail = self.size - self.flushed
            if tail > 0:
                self._view[tail : _aligned(tail)] = 0
                self._pwrite(memoryview(self._stage)[: _aligned(tail)], self.flushed)
            if self._head_map is not None:
                self._pwrite(memoryview(self._head_map)[: _aligned(min(len(self._head), max(self.size, 1)))], 0)
            os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)
            del self._view, self._head
            for buffer in (self._stage, self._head_map):
                with contextlib.suppress(BufferError):  # still seen by a failed write's traceback: freed with it
                    buffer.close() if buffer is not None else None

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
