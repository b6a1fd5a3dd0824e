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
    """
    workers = worker_count(device, items)
    make = scratch or (lambda index: None)
    if workers <= 1:
        state = make(0)
        for i in range(items):
            fn(i, state)
        return
    threads_before = torch.get_num_threads()
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
    for t in pool:
        t.join()
    if failed:
        raise failed[0]


def run_each(fns: Sequence[Callable[[Any], object]], device: torch.device | str, scratch: Callable[[int], Any] | None = None) -> None:
    """:func:`run` over a list of closures, each called with its thread's state."""
    run(lambda i, state: fns[i](state), len(fns), device, scratch)
