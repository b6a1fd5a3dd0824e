"""Writing outputs as users expect: atomically, with the permissions ``open()`` would give,
never over an existing file without ``force`` (which keeps the replaced file's mode), and
checked before any work is done."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator

from ..errors import CheckpointError, problem


def _fail(path: str, message: str) -> CheckpointError:
    return CheckpointError(problem(message, source=path, code="output"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: str, *, force: bool, folder: bool = False, inputs: tuple[str, ...] = ()) -> None:
    """Refuse an output location that cannot work, before anything is loaded or pruned.

    Args:
        path: where the output will go (a file, or with ``folder`` a directory).
        force: an existing output may be replaced.
        folder: the output is a directory (a Hugging Face folder).
        inputs: paths read as inputs; writing over one needs ``force``.

    Raises:
        CheckpointError: the parent folder is missing or not writable, the name is not valid
            here, the output exists (without ``force``), is of the other kind, or is an input.
    """
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    name = os.path.basename(full)
    if not name or name in (".", ".."):
        raise _fail(path, "is not a file name")
    if not os.path.isdir(parent):
        raise _fail(path, f"folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _fail(path, f"folder {parent} is not writable")
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    if len(os.fsencode(name)) > limit:
        raise _fail(path, f"the file name is {len(os.fsencode(name))} bytes; this file system allows {limit}")
    if os.path.lexists(full):
        if os.path.isdir(full) != folder:
            kind = "a folder" if os.path.isdir(full) else "a file"
            raise _fail(path, f"already exists as {kind}; the output would be {'a folder' if folder else 'a file'}")
        if not force:
            raise _fail(path, "already exists; refusing to overwrite it (use --force)")
    try:  # the folder really takes a new file (a read-only mount, /proc, quotas...)
        probe = _temp_name(full)
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise _fail(path, f"folder {parent} does not take new files ({exc.strerror or exc})") from None
    for source in inputs:
        if source and os.path.exists(source) and os.path.exists(full) and os.path.samefile(source, full) and not force:
            raise _fail(path, "is an input of this run; refusing to overwrite it (use --force)")
    if folder and force and os.path.isdir(full) and not os.path.islink(full):
        _check_replaceable(path, full, inputs)


#: what a model folder holds; --force replaces a folder only when it is one (or empty)
_MODEL_FOLDER_MARKS = ("config.json", "prunerecipe.json")


def _check_replaceable(path: str, full: str, inputs: tuple[str, ...]) -> None:
    """``--force`` deletes the folder it replaces: refuse a folder holding an input of this
    run, or one that is not a model folder (subfolders, or neither ``config.json`` nor
    ``prunerecipe.json``), whose other files would be lost."""
    real = os.path.realpath(full)
    for source in inputs:
        if source and os.path.exists(source):
            inner = os.path.realpath(source)
            if inner != real and os.path.commonpath([inner, real]) == real:
                raise _fail(path, f"holds {source}, an input of this run: --force would delete it with the folder; write elsewhere")
    try:
        entries = sorted(os.listdir(full))
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or exc})") from None
    folders = [e + "/" for e in entries if os.path.isdir(os.path.join(full, e))]
    if entries and (folders or not any(mark in entries for mark in _MODEL_FOLDER_MARKS)):
        shown = ", ".join((folders + [e for e in entries if e + "/" not in folders])[:5]) + (", ..." if len(entries) > 5 else "")
        raise _fail(
            path,
            f"is a folder that is not a model folder (it holds {shown}): --force replaces a model folder (or an empty one) "
            "with all its files; choose another path, or remove it yourself",
        )


def _temp_name(target: str) -> str:
    """A short hidden name beside ``target``: any name ``torch.save`` accepts, we accept too."""
    return os.path.join(os.path.dirname(os.path.abspath(target)), f".prunerecipe-{secrets.token_hex(4)}.tmp")


def _final_mode(target: str, directory: bool) -> int:
    """The mode the output gets: the replaced file's when there is one, else what ``open()``
    (or ``mkdir``) gives under the current umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def failures_named(path: str) -> Iterator[None]:
    """Errors of the file system while writing ``path`` become a :class:`CheckpointError`
    naming ``path`` (not a temp file)."""
    try:
        yield
    except OSError as exc:
        raise _fail(path, f"cannot write it: {exc.strerror or exc}") from exc
    except Exception as exc:
        if not _write_failure(exc):
            raise
        raise _fail(path, f"cannot write it: {_write_reason(exc, path)}") from exc


def _write_failure(exc: Exception) -> bool:
    """An error of a writer library that reports a failed write in its own way: safetensors'
    ``SafetensorError`` (an I/O error underneath), ``torch.save``'s zip writer."""
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        return "I/O error" in text or "os error" in text
    return isinstance(exc, RuntimeError) and any(s in text for s in ("PytorchStreamWriter", "inline_container", "file write failed"))


def _write_reason(exc: Exception, path: str) -> str:
    try:
        full = os.statvfs(os.path.dirname(os.path.abspath(path))).f_bavail == 0
    except OSError:
        full = False
    if full or "No space left" in str(exc):
        return "No space left on device"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def atomic_file(path: str, *, force: bool) -> Iterator[str]:
    """Yield a temp path beside ``path`` to write; on success it is renamed into place.

    Without ``force`` an existing ``path`` is never replaced, even one that appeared meanwhile.
    On failure (or Ctrl-C) the temp file is removed and ``path`` is untouched.
    """
    target = os.path.abspath(path)
    tmp = _temp_name(target)
    mode = _final_mode(target, directory=False)
    try:
        with failures_named(path):
            yield tmp
        with failures_named(path), open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if force:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if the target appeared meanwhile: no clobbering, even in a race
            except FileExistsError:
                raise _fail(path, "already exists; refusing to overwrite it (use --force)") from None
            except OSError:  # file systems without hard links
                if os.path.lexists(target):
                    raise _fail(path, "already exists; refusing to overwrite it (use --force)") from None
                os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: str, *, force: bool) -> Iterator[str]:
    """Yield a temp folder beside ``path`` to fill; on success it takes ``path``'s place (an
    existing folder is replaced only with ``force``). Files in it get the mode ``open()`` gives."""
    target = os.path.abspath(path)
    tmp = _temp_name(target)
    mode = _final_mode(target, directory=True)
    with failures_named(path):
        os.mkdir(tmp)
    old = None
    try:
        with failures_named(path):
            yield tmp
        file_mode = 0o666 & ~_umask()
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), file_mode)  # safetensors and friends create files 0600
        os.chmod(tmp, mode)
        if os.path.lexists(target):
            if not force:
                raise _fail(path, "already exists; refusing to overwrite it (use --force)")
            old = _temp_name(target)
            os.rename(target, old)  # a symlink is moved as the link, and then removed as one
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None:  # put the replaced folder back
                os.rename(old, target)
                old = None
            raise
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if os.path.islink(old):
                os.unlink(old)
            else:
                shutil.rmtree(old, ignore_errors=True)
