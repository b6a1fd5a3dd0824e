"""An output file written front to back with direct I/O (``O_DIRECT``), past the page cache.

A streaming run writes a checkpoint as large as the input, often larger than the memory: written
through the page cache, every byte is first copied into a newly allocated cache page (most of a
plain copy's time), and the output evicts everything else the cache held (the input's pages
among them). Direct I/O hands aligned blocks to the disk from one reused buffer instead.

It needs block-aligned offsets, sizes and memory, so the bytes go through a page-aligned
:class:`Stage` buffer and are written in whole blocks; the part of a block not yet complete
(under 4 KiB) is kept with its file between writes, so one stage serves all the files of a run
(shards are written one at a time). The first blocks (the safetensors header, rewritten at the
end with the final metadata) are held in memory until :meth:`DirectFile.close`, which also
writes the last partial block padded and truncates the file to its length. Where direct I/O is
not available (no ``O_DIRECT`` on the platform, a file system that refuses it: tmpfs on older
kernels, some network file systems), the same file is written through the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading

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


class Stage:
    """A page-aligned block buffer, shared by the files of a run, and the lock under which they
    use it one at a time (a file being closed waits for a write in another thread to end)."""

    def __init__(self, size: int | None = None) -> None:
        self.size = STAGE if size is None else _aligned(size)
        self.map = mmap.mmap(-1, self.size)
        self.view = torch.frombuffer(self.map, dtype=torch.uint8)
        self.lock = threading.RLock()
        self.closed = False

    def close(self) -> None:
        """Free the buffer (after any write under way)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            del self.view
            with contextlib.suppress(BufferError):  # still seen by a failed write's traceback: freed with it
                self.map.close()


class DirectFile:
    """A write-only binary file for :class:`~.format.Writer`: appends, and rewrites of the
    first ``keep_head`` bytes until :meth:`close`.

    Args:
        path: the file to create (truncated when it exists), with the mode ``open()`` gives.
        stage: the block buffer to write through (shared by the files of a run); None: one of
            its own, freed by :meth:`close`.
    """

    def __init__(self, path: str, stage: Stage | None = None) -> None:
        self._own = stage is None
        self.stage = Stage() if stage is None else stage
        self._head = torch.zeros(0, dtype=torch.uint8)  # bytes [0, len(head)), written by close()
        self._head_map: mmap.mmap | None = None
        self._tail = torch.zeros(0, dtype=torch.uint8)  # the incomplete block at ``flushed``
        self.flushed = 0  # bytes of the file written, after the head (a multiple of ALIGN)
        self.size = 0  # bytes written so far (the file's length at close)
        self.cursor = 0  # where the next write goes
        self.closed = False
        self.direct = False
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0)
        self.fd = -1
        try:
            if direct:
                try:
                    self.fd = os.open(path, flags | direct, 0o666)
                    self.direct = True
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # the file system refuses direct I/O: buffered below
                        raise
            if self.fd < 0:
                self.fd = os.open(path, flags, 0o666)
        except BaseException:
            if self._own:
                self.stage.close()
            raise

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
        with self.stage.lock:
            if self.closed or self.stage.closed:
                raise ValueError("I/O operation on closed file")
            if self.cursor != self.size:  # a rewrite: only inside the head
                if self.cursor + n > len(self._head):
                    raise OSError(errno.ESPIPE, "a direct-I/O file can only rewrite its held head")
                self._head[self.cursor : self.cursor + n] = src
                self.cursor += n
                self.size = max(self.size, self.cursor)  # (it may run past the end, inside the head)
                return n
            done = 0
            if self.size < len(self._head):
                k = min(n, len(self._head) - self.size)
                self._head[self.size : self.size + k] = src[:k]
                done = k
                self.size += k
            if done < n:
                self._append(src, done)
            self.cursor = self.size
            return n

    def _append(self, src: torch.Tensor, done: int) -> None:
        """Bytes ``done:`` of ``src`` after the head, in whole blocks through the stage; what is
        left of an incomplete block is kept in ``_tail``."""
        stage, room = self.stage.view, self.stage.size
        at = len(self._tail)
        stage[:at] = self._tail
        n = len(src)
        while done < n:
            k = min(n - done, room - at)
            stage[at : at + k].copy_(src[done : done + k])  # (torch lets go of the GIL here)
            done += k
            at += k
            self.size += k
            whole = at if at == room else at // ALIGN * ALIGN if done == n else 0
            if whole:
                self._pwrite(memoryview(self.stage.map)[:whole], self.flushed)
                self.flushed += whole
                stage[: at - whole] = stage[whole:at].clone()
                at -= whole
        self._tail = stage[:at].clone()

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
        to its length, and close it (after a write under way in another thread ends)."""
        with self.stage.lock:
            if self.closed:
                return
            self.closed = True
            try:
                if len(self._tail):  # the last block, padded (in a buffer of its own: the stage may be gone)
                    last = mmap.mmap(-1, _aligned(len(self._tail)))
                    try:
                        torch.frombuffer(last, dtype=torch.uint8)[: len(self._tail)] = self._tail
                        self._pwrite(memoryview(last), self.flushed)
                    finally:
                        with contextlib.suppress(BufferError):
                            last.close()
                if self._head_map is not None:
                    self._pwrite(memoryview(self._head_map)[: _aligned(min(len(self._head), max(self.size, 1)))], 0)
                os.ftruncate(self.fd, self.size)
            finally:
                os.close(self.fd)
                del self._head
                if self._head_map is not None:
                    with contextlib.suppress(BufferError):  # still seen by a failed write's traceback: freed with it
                        self._head_map.close()
                if self._own:
                    self.stage.close()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
