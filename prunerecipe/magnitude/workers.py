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

import functools
import threading
from collections.abc import Callable, Sequence
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


def chunks(numel: int, size: int = CHUNK) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of at most ``size`` entries covering ``range(numel)``."""
    return [(a, min(a + size, numel)) for a in range(0, numel, size)]


class Arena:
    """Scratch memory carved from a tensor that is allocated for later use and not written yet
    (a mask about to be built, say): work done before that tensor is written then needs no
    memory of its own, so peak memory stays what the result itself takes. Split into one
    region per worker thread; a region that runs out falls back to ordinary allocations."""

    def __init__(self, storage: torch.Tensor | None, parts: int) -> None:
        self.regions: list[tuple[torch.Tensor, list[int]]] = []
        if storage is None or not storage.is_contiguous() or storage.numel() == 0:
            return
        raw = storage.view(-1).view(torch.uint8)
        size = raw.numel() // max(parts, 1) // 64 * 64
        self.regions = [(raw[i * size : (i + 1) * size], [0]) for i in range(parts)] if size else []

    def scratch(self, index: int) -> dict[Any, Any]:
        """A fresh scratch dict for worker ``index``, lending it that worker's region."""
        return {"arena": self.regions[index]} if index < len(self.regions) else {}


def buffer(scratch: dict[Any, Any], name: str, n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A flat scratch tensor of ``n`` entries kept in ``scratch`` for reuse (one chunk at least),
    carved from the lent arena region when there is room."""
    key = (name, dtype)
    buf = scratch.get(key)
    if buf is None or buf.numel() < n:
        entries = max(n, CHUNK)
        buf = None
        region = scratch.get("arena")
        if region is not None and region[0].device == torch.device(device):
            room, used = region
            start = -(-used[0] // 64) * 64  # aligned for every dtype
            stop = start + entries * torch.empty((), dtype=dtype).element_size()
            if stop <= room.numel():
                buf = room[start:stop].view(dtype)
                used[0] = stop
        if buf is None:
            buf = torch.empty(entries, dtype=dtype, device=device)
        scratch[key] = buf
    return buf[:n]


def run(fn: Callable[[int, Any], object], items: int, device: torch.device | str, scratch: Callable[[int], Any] | None = None) -> None:
    """Call ``fn(i, state)`` for each ``i`` in ``range(items)``, on several threads when it pays.

    Args:
        fn: the work for item ``i``; ``state`` is this thread's own ``scratch(thread_index)``.
            It must only write what belongs to item ``i``.
        items: how many items.
        device: where the tensors live (only CPU work is spread over threads).
        scratch: builds one thread's private state (buffers), once per thread.

    Raises:
        Whatever ``fn`` raised first; the other threads stop taking new items.

    The worker threads run with the caller's grad mode (``torch.no_grad()`` is per thread).
    """
    workers = worker_count(device, items)
    make = scratch or (lambda index: None)
    if workers <= 1:
        state = make(0)
        for i in range(items):
            fn(i, state)
        return
    threads_before = torch.get_num_threads()
    grad = torch.is_grad_enabled()  # thread-local: each worker takes the caller's
    lock = threading.Lock()
    counter = iter(range(items))
    failed: list[BaseException] = []
    ready = threading.Barrier(workers + 1)

    def worker(index: int) -> None:
        try:
            # Single-threaded ops in this thread; the tiny op makes torch adopt the setting
            # for this thread now, before the caller restores the global one.
            torch.set_num_threads(1)
            torch.zeros(2).add_(1)
            torch.set_grad_enabled(grad)
            state = make(index)
        except BaseException as exc:  # pragma: no cover - allocation failure, say
            failed.append(exc)
            ready.abort()
            return
        try:
            ready.wait()
        except threading.BrokenBarrierError:  # pragma: no cover - another thread failed to start
            return
        while not failed:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                fn(i, state)
            except BaseException as exc:
                failed.append(exc)
                return

    pool = [threading.Thread(target=worker, args=(w,), name=f"prunerecipe-{w}", daemon=True) for w in range(workers)]
    for t in pool:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    finally:
        torch.set_num_threads(threads_before)
    try:
        for t in pool:
            t.join()
    except BaseException as exc:  # Ctrl-C while waiting: stop handing out items, let the threads finish theirs
        failed.append(exc)
        for t in pool:
            t.join()
        raise
    if failed:
        raise failed[0]


def run_each(fns: Sequence[Callable[[Any], object]], device: torch.device | str, scratch: Callable[[int], Any] | None = None) -> None:
    """:func:`run` over a list of closures, each called with its thread's state."""
    run(lambda i, state: fns[i](state), len(fns), device, scratch)
