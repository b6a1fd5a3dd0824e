"""The streaming output's direct-I/O file: the bytes it leaves are exactly what was written, with
the header rewritten in place; where direct I/O is refused it falls back to the page cache."""

from __future__ import annotations

import errno
import os
import random

import pytest

import prunerecipe.stream.direct as direct
from prunerecipe.stream.direct import DirectFile


def _write_some(f: DirectFile, seed: int, head: int = 300) -> bytes:
    rng = random.Random(seed)
    f.keep_head(head)
    expected = bytearray(os.urandom(head))
    f.write(bytes(expected))
    for _ in range(60):
        chunk = os.urandom(rng.choice([0, 1, 7, 511, 4096, 5000, 20000, 70001]))
        f.write(memoryview(chunk))
        expected += chunk
    f.flush()
    f.seek(8)
    f.write(b"final header")
    expected[8:20] = b"final header"
    assert f.seek(0, os.SEEK_END) == len(expected)
    return bytes(expected)


@pytest.mark.parametrize("stage", [8192, 1 << 20])
def test_what_is_written_reads_back_byte_for_byte(tmp_path, monkeypatch, stage):
    monkeypatch.setattr(direct, "STAGE", stage)  # many stage flushes, or none
    path = tmp_path / "out.bin"
    f = DirectFile(str(path))
    expected = _write_some(f, seed=stage)
    f.close()
    f.close()  # a second close does nothing
    assert path.read_bytes() == expected
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask  # the mode open() gives


def test_a_file_shorter_than_its_held_head_and_an_empty_one(tmp_path):
    for n in (0, 5, 4097):
        path = tmp_path / f"short{n}.bin"
        with DirectFile(str(path)) as f:
            f.keep_head(10000)
            data = os.urandom(n)
            f.write(data)
        assert path.read_bytes() == data


def test_rewrites_outside_the_held_head_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "STAGE", 8192)
    f = DirectFile(str(tmp_path / "o.bin"))
    f.keep_head(16)
    f.write(os.urandom(50000))
    f.seek(20000)
    with pytest.raises(OSError, match="held head"):
        f.write(b"x")
    with pytest.raises(OSError):
        f.seek(60000)
    with pytest.raises(ValueError, match="before the first write"):
        f.keep_head(16)
    f.close()


def test_a_file_system_refusing_direct_io_at_open_gets_the_page_cache(tmp_path, monkeypatch):
    real = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    path = tmp_path / "o.bin"
    f = DirectFile(str(path))
    assert not f.direct
    expected = _write_some(f, seed=1)
    f.close()
    assert path.read_bytes() == expected


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_direct_io_refused_at_the_first_write_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "STAGE", 8192)
    real = os.pwrite
    refused = []

    def pwrite(fd, buf, offset):
        if not refused:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    path = tmp_path / "o.bin"
    f = DirectFile(str(path))
    assert f.direct
    expected = _write_some(f, seed=2)
    f.close()
    assert refused and not f.direct
    assert path.read_bytes() == expected


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "STAGE", 8192)

    def full(fd, buf, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    f = DirectFile(str(tmp_path / "o.bin"))
    f.keep_head(16)
    with pytest.raises(OSError, match="No space left"):
        f.write(os.urandom(20000))
    with pytest.raises(OSError, match="No space left"):  # the held head cannot be written either
        f.close()
    assert f.closed
    with pytest.raises(ValueError, match="closed file"):
        f.write(b"x")


def test_a_rewrite_running_past_the_end_inside_the_head_extends_the_file(tmp_path):
    path = tmp_path / "o.bin"
    with DirectFile(str(path)) as f:
        f.keep_head(100)
        f.write(b"0123456789")
        f.seek(5)
        f.write(b"ABCDEFGHIJKLMNOP")
        f.write(b"Z")
    assert path.read_bytes() == b"01234ABCDEFGHIJKLMNOPZ"  # what a plain file gives


def test_files_sharing_one_stage_take_turns_and_keep_their_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "STAGE", 8192)
    stage = direct.Stage()
    files = [DirectFile(str(tmp_path / f"{i}.bin"), stage) for i in range(3)]
    expected = [bytearray() for _ in files]
    rng = random.Random(5)
    for f in files:
        f.keep_head(100)
    for _ in range(90):  # interleaved writes, as shards written a piece at a time
        i = rng.randrange(3)
        chunk = os.urandom(rng.choice([1, 100, 4095, 4096, 5000, 9000, 20000]))
        files[i].write(chunk)
        expected[i] += chunk
    for f in files:
        f.close()
    stage.close()
    for i in range(3):
        assert (tmp_path / f"{i}.bin").read_bytes() == bytes(expected[i])


def test_closing_while_another_thread_writes_waits_for_the_write(tmp_path, monkeypatch):
    """A run stopped (SIGTERM, Ctrl-C, an error) closes its files while the writer thread may be
    in the middle of a write: close must wait for it, not free the buffer under it."""
    import threading
    import time

    import torch

    monkeypatch.setattr(direct, "STAGE", 1 << 20)
    path = tmp_path / "o.bin"
    f = DirectFile(str(path))
    data = torch.arange(1 << 24, dtype=torch.int32).view(torch.uint8)  # 64 MiB: many stage flushes
    errors: list[BaseException] = []

    def write() -> None:
        try:
            f.write(data)
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.01)
    f.close()  # waits for the write under way
    writer.join()
    assert not errors
    assert path.read_bytes() == data.numpy().tobytes()
