"""A streaming run's output: the files, written atomically, each tensor in turn (the tensors
no step touches while the cut passes run), and the metadata that summarises them, put in each
header once everything is written."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..checkpoint import atomic_file, atomic_folder, parse_size
from ..checkpoint import hf as hf_files
from ..checkpoint.files import failures_named
from ..checkpoint.write import dense_metadata, summary_of
from ..report import Report
from ..spec import Recipe
from .direct import DirectFile, Stage
from .format import Writer, entries_in_file_order
from .planned import StreamPlan
from .run import Progress, Run, first_seen


def execute(
    sp: StreamPlan,
    recipe: Recipe,
    out: str,
    *,
    force: bool,
    max_shard_size: str | int,
    source_folder: str | None,
    progress: Callable[[Progress], None] | None,
) -> tuple[Report, int]:
    """Run ``sp`` and write ``out`` atomically; returns the report and the files written."""
    run = Run(sp, recipe, progress)
    run.replay()
    targets = [m.qualname for m in first_seen(sp)]
    floating = [(n, e.shape, math.prod(e.shape)) for n, e in sp.entries.items() if e.dtype.is_floating_point]
    widest = _widest(summary_of(floating, fmt=sp.fmt, recipe_text=_text(recipe), recipe_source=recipe.source, targets=targets))
    total = sum(e.nbytes for e in sp.entries.values())
    if sp.fmt == "dense":
        parts, files, room = [list(sp.entries)], [""], dense_metadata(widest, sp.aliases)
    else:
        parts = hf_files.shard({n: e.nbytes for n, e in sp.entries.items()}, parse_size(max_shard_size))
        files, room = hf_files.shard_files(len(parts)), hf_files.shard_metadata(widest)
    context = atomic_file(out, force=force) if sp.fmt == "dense" else atomic_folder(out, force=force)
    with context as tmp:
        handles: list[DirectFile] = []
        stage = Stage()  # one block buffer for every file: they are written one at a time
        try:
            writers = []
            for file, part in zip(files, parts):
                handles.append(DirectFile(os.path.join(tmp, file) if file else tmp, stage))  # closed below, once the headers are final
                writers.append(open_writer(run, handles[-1], part, room))
            # the tensors no step touches are written while the cut passes read the group
            early = _Background(lambda: write_untouched(run, writers))
            try:
                run.find_cuts()
            finally:
                early.join()
            run.passes_done += 1
            done = [sum(w.written for w in writers), sum(sp.entries[e[0]].nbytes for w in writers for e in w.entries[: w.written])]
            write_rest(run, writers, done, total)
            info = summary_of(run.sorted_rows(), fmt=sp.fmt, recipe_text=_text(recipe), recipe_source=recipe.source, targets=targets)
            for writer in writers:
                writer.finish(dense_metadata(info, sp.aliases) if sp.fmt == "dense" else hf_files.shard_metadata(info))
        finally:
            for fh in handles:  # (each waits for a write under way in the writer thread)
                with failures_named(out):
                    fh.close()
            stage.close()
        if sp.fmt == "hf":
            hf_files.write_folder_files(tmp, sp.model, source_folder)
            hf_files.write_index(tmp, files, [[sp.stored.get(n, n) for n in part] for part in parts], total)
            hf_files.write_summary(tmp, info)
    run.finish_rng()
    return run.report(), len(parts)


class _Background:
    """``fn()`` in a thread; :meth:`join` waits and raises what it raised."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._error: BaseException | None = None

        def work() -> None:
            try:
                fn()
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=work, name="prunerecipe-early-writer", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def open_writer(run: Run, fh: DirectFile, names: list[str], room: dict[str, str] | None) -> Writer:
    """An output file's writer: wider dtypes first, and within a dtype the tensors no step
    touches first (they are written while the cut passes run)."""
    sp = run.sp
    order = entries_in_file_order([(n, sp.entries[n].dtype, sp.entries[n].shape) for n in names])
    order.sort(key=lambda e: (-torch.empty((), dtype=e[1]).element_size(), e[0] in sp.members))
    return Writer(fh, order, room, sp.stored)


def write_untouched(run: Run, writers: list[Writer]) -> None:
    """Each file's leading tensors that no step touches (no cut needed)."""
    for writer in writers:
        while writer.pending is not None and writer.pending not in run.sp.members:
            name = writer.pending
            writer.write(name, run.final(name))


def write_rest(run: Run, writers: list[Writer], done: list[int], total: int) -> None:
    """Everything not written yet, file by file; the next tensor is pruned while one is written."""
    sp = run.sp
    for writer in writers:
        for name, _, _ in writer.entries[writer.written :]:  # (the writer counts them as its thread writes)
            run.pipe.put(writer, name, run.final(name))
            done[0] += 1
            done[1] += sp.entries[name].nbytes
            run.report_progress("prune and write", done[0], len(sp.entries), done[1], total)
        run.pipe.wait()


def _widest(value: Any) -> Any:
    """A summary with every float at its longest ``repr`` (room for the final header)."""
    if isinstance(value, float):
        return -1.2345678901234567e-300
    if isinstance(value, dict):
        return {k: _widest(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_widest(v) for v in value]
    return value


def _text(recipe: Recipe) -> str | None:
    return getattr(recipe.document, "text", None)
