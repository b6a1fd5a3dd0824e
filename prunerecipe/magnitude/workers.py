"""Running many small torch ops over chunks of big tensors, on all cores, robustly on a busy CPU.

torch splits every large op over its OpenMP threads and waits for all of them at the end.
When the CPU is shared (other processes, a container quota below the core count), one of
those threads is often descheduled, and each op then waits for it: a pass made of many
cache-sized ops slows down 10-20x. Here, instead, a few Python threads each take the next
chunk from a shared counter and run its ops single-threaded (torch releases the GIL inside
ops). A descheduled thread then only delays its own chunk; the others keep going.

Used for CPU tensors with torch's OpenMP backend; elsewhere (CUDA, other thread backends,
one thread) the work runs in the calling thread, op by op, as torch would run it.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

#: Entries per chunk: small enough that a chunk's temporaries stay in the core's cache.
CHUNK = 1 << 18


@functools.lru_cache(maxsize=1)
def _openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def worker_count(device: torch.device | str, items: int) -> int:
    """How many threads :func:`run` uses for ``items`` chunks on ``device`` (1: inline)."""
    if torch.device(device).type != "cpu" or not _openmp():
        return 1
    return max(1, min(torch.get_num_threads(), items))


@contextmanager
def inline_ops(device: torch.device | str) -> Iterator[None]:
    """The calling thread's torch ops run single-threaded for the block (the setting is restored
    after it). For a run of many small ops on CPU tensors (a sample, a few candidates per
    tensor): split over OpenMP threads, each of them waits for all the threads at its end, and
    on a busy CPU one of them is often descheduled. No :func:`run` inside the block: it would
    run inline too."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or not _openmp() or threads <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def chunks(numel: int, size: int = CHUNK) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of at most ``size`` entries covering ``range(numel)``."""
    return [(a, min(a + size, numel)) for a in range(0, numel, size)]


_malloc_trim: Any = None  # None: not looked up yet; False: unavailable; else the C function


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``, every arena):
    the small tensors a scan frees (in each worker thread's own arena) then do not stay
    resident under the masks and weights built next. A no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:  # the process's own symbols: no library search, no subprocess
                trim = ctypes.CDLL(None).malloc_trim
                trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
                _malloc_trim = trim
            except (OSError, AttributeError):  # musl and friends have no malloc_trim
                pass
    if _malloc_trim:
        _malloc_trim(0)


class Arena:
    """Scratch memory carved from tensors that are allocated for later use and not written yet
    (masks about to be built, say): work done before they are written then needs no memory of
    its own, so peak memory stays what the result itself takes. One region per worker thread:
    a whole tensor each when there are enough of them (a thread whose region runs out then
    takes a spare one), else the largest split; when nothing is left, ordinary allocations."""

    def __init__(self, storage: torch.Tensor | Sequence[torch.Tensor] | None, parts: int) -> None:
        self.regions: list[tuple[torch.Tensor, list[int]]] = []
        self.spare: list[tuple[torch.Tensor, list[int]]] = []
        self.lock = threading.Lock()
        whole = [storage] if isinstance(storage, torch.Tensor) else list(storage or [])
        whole = sorted((t for t in whole if t.is_contiguous() and t.numel()), key=lambda t: t.numel() * t.element_size(), reverse=True)
        if not whole or parts < 1:
            return
        if len(whole) >= parts > 1:
            every = [(t.view(-1).view(torch.uint8), [0]) for t in whole]
            self.regions, self.spare = every[:parts], every[parts:]
            return
        raw = whole[0].view(-1).view(torch.uint8)
        size = raw.numel() // parts // 64 * 64
        self.regions = [(raw[i * size : (i + 1) * size], [0]) for i in range(parts)] if size else []

    def scratch(self, index: int) -> dict[Any, Any]:
        """A fresh scratch dict for worker ``index``, lending it that worker's region."""
        return {"arena": self.regions[index], "spare": self} if index < len(self.regions) else {}

    def more(self) -> tuple[torch.Tensor, list[int]] | None:
        """A spare region (a whole tensor no thread has used), or None."""
        with self.lock:
            return self.spare.pop(0) if self.spare else None


def carve(scratch: dict[Any, Any], nbytes: int, device: torch.device | str) -> torch.Tensor | None:
    """``nbytes`` of the lent arena region (64-byte aligned), or None when it has no room and
    the arena no spare region (``scratch["arena"]`` then moves on to the spare one)."""
    region = scratch.get("arena")
    if region is None or region[0].device != torch.device(device):
        return None
    while True:
        room, used = region
        start = -(-used[0] // 64) * 64  # aligned for every dtype
        if start + nbytes <= room.numel():
            used[0] = start + nbytes
            return room[start : start + nbytes]
        arena = scratch.get("spare")
        region = arena.more() if arena is not None else None
        if region is None:
            return None
        scratch["arena"] = region


def buffer(scratch: dict[Any, Any], name: str, n: int, dtype: torch.dtype, device: torch.device | str, least: int = CHUNK) -> torch.Tensor:
    """A flat scratch tensor of ``n`` entries kept in ``scratch`` for reuse (``least`` entries at
    least: one chunk's worth by default), carved from the lent arena region when there is room.

    Its storage always holds ``max(n, least)`` entries from its start, so an op may write a
    result of up to that many entries into ``buffer(...)[:0]`` (``out=``) without allocating."""
    key = (name, dtype)
    buf = scratch.get(key)
    if buf is None or buf.numel() < n:
        entries = max(n, least)
        room = carve(scratch, entries * torch.empty((), dtype=dtype).element_size(), device)
        buf = scratch[key] = torch.empty(entries, dtype=dtype, device=device) if room is None else room.view(dtype)
    return buf[:n]


class _Job:
    """One call of :func:`run`, shared by the threads that work on it."""

    def __init__(self, fn: Callable[[int, Any], object], items: int, make: Callable[[int], Any], threads: int, grad: bool) -> None:
        self.fn, self.make, self.grad = fn, make, grad
        self.counter = iter(range(items))
        self.lock = threading.Lock()
        self.failed: list[BaseException] = []
        self.left = threads  # threads still working on it
        self.done = threading.Condition(self.lock)

    def work(self, index: int) -> None:
        state = None
        try:
            torch.set_grad_enabled(self.grad)  # thread-local: each worker takes the caller's
            state = self.make(index)
            while not self.failed:
                with self.lock:
                    i = next(self.counter, None)
                if i is None:
                    break
                self.fn(i, state)
        except BaseException as exc:
            self.failed.append(exc)
        finally:
            # What this thread holds goes before it says it is done: once the caller has
            # returned, the interpreter may be exiting, and a daemon thread that frees a tensor
            # then (torch lets go of the GIL to do it) aborts the whole process.
            state = None
            with self.lock:
                self.left -= 1
                if not self.left:  # the last thread: the closures (and the tensors they hold) go now
                    self.fn, self.make = _nothing, _nothing
                self.done.notify_all()


def _nothing(*_args: object) -> None:
    return None


class _Pool:
    """Worker threads kept for the life of the process (as torch keeps its OpenMP threads):
    started once, each with single-threaded torch ops, then given jobs. Re-made after a fork;
    stopped and joined at exit (see :meth:`stop`)."""

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()
        self.size = size
        self.jobs: list[list[_Job]] = [[] for _ in range(size)]
        self.wake = threading.Condition()
        self.stopping = False
        started = threading.Barrier(size + 1)
        threads_before = torch.get_num_threads()
        self.threads = [threading.Thread(target=self._loop, args=(i, started), name=f"prunerecipe-{i}", daemon=True) for i in range(size)]
        for thread in self.threads:
            thread.start()
        try:
            started.wait()
        finally:
            torch.set_num_threads(threads_before)
        atexit.register(self.stop)

    def _loop(self, index: int, started: threading.Barrier) -> None:
        # Single-threaded ops in this thread. torch sets a thread's OpenMP thread count from its
        # global setting the first time the thread asks for it (its first op big enough to be
        # split), which would undo a setting made before: ask first, then set (the caller
        # restores the global setting once every worker has set its own).
        torch.get_num_threads()
        torch.set_num_threads(1)
        started.wait()
        while True:
            with self.wake:
                while not self.jobs[index] and not self.stopping:
                    self.wake.wait()
                if not self.jobs[index]:  # stopped
                    return
                job = self.jobs[index].pop(0)
            job.work(index)
            # An idle thread must not keep its last job: the job's closure holds the tensors it
            # worked on (views of weights), which would stay alive after their owners replaced them.
            del job

    def stop(self) -> None:
        """Let the threads end once their jobs are done, and wait for them. Run at exit (and
        when a bigger pool replaces this one): a daemon thread still running when the
        interpreter finalizes is killed wherever it is, which aborts the process if that is
        inside torch."""
        if self.pid != os.getpid():  # after a fork: this process never had these threads
            return
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join()

    def submit(self, job: _Job, threads: int) -> None:
        with self.wake:
            for index in range(threads):
                self.jobs[index].append(job)
            self.wake.notify_all()


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _get_pool(size: int) -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid() or _pool.size < size or _pool.stopping:
            if _pool is not None:
                _pool.stop()
            _pool = _Pool(size)
        return _pool


def run(fn: Callable[[int, Any], object], items: int, device: torch.device | str, scratch: Callable[[int], Any] | None = None) -> None:
    """Call ``fn(i, state)`` for each ``i`` in ``range(items)``, on several threads when it pays.

    Args:
        fn: the work for item ``i``; ``state`` is this thread's own ``scratch(thread_index)``.
            It must only write what belongs to item ``i``.
        items: how many items.
        device: where the tensors live (only CPU work is spread over threads).
        scratch: builds one thread's private state (buffers), once per thread and call.

    Raises:
        Whatever ``fn`` raised first; the other threads stop taking new items.

    The worker threads run with the caller's grad mode (``torch.no_grad()`` is per thread).
    Calls from several threads at once are safe; each waits for its own items.
    """
    threads = worker_count(device, items)
    make = scratch or (lambda index: None)
    if threads <= 1 or threading.current_thread().name.startswith("prunerecipe-"):
        state = make(0)
        for i in range(items):
            fn(i, state)
        return
    job = _Job(fn, items, make, threads, torch.is_grad_enabled())
    _get_pool(threads).submit(job, threads)
    with job.lock:
        while job.left:
            try:
                job.done.wait()
            except BaseException as exc:  # Ctrl-C while waiting: no new items; let the threads finish theirs
                job.failed.append(exc)
    failed, job.failed = job.failed, []  # (a worker may still hold the job for a moment: not the errors)
    if failed:
        raise failed[0]


def run_each(fns: Sequence[Callable[[Any], object]], device: torch.device | str, scratch: Callable[[int], Any] | None = None) -> None:
    """:func:`run` over a list of closures, each called with its thread's state."""
    run(lambda i, state: fns[i](state), len(fns), device, scratch)
