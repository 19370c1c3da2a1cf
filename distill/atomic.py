"""Atomic file writes: write a temp file in the same directory, fsync, rename.

A crash or Ctrl-C leaves either the old file or the new one, never a half-written one. A write
that fails (a full disk) is one ``WriteError`` line naming the file and the reason.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from distill.errors import DistillError


class WriteError(DistillError):
    """Writing ``path`` failed with ``err`` (e.g. "No space left on device"); the old file is kept."""

    def __init__(self, path: Path, err: OSError) -> None:
        self.path, self.reason = path, err.strerror or str(err)
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        advice = "free disk space or choose another location" if full else "choose another location"
        super().__init__(f"cannot write {path}: {self.reason} ({advice})", exit_code=1)


class _Recording:
    """A file object that remembers the first ``OSError`` of its writes: ``torch.save`` turns a failed
    write into a ``RuntimeError`` ("unexpected pos ...") that no longer says why it failed."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.f, name)(*args)
        except OSError as err:
            self.error = self.error or err
            raise

    def write(self, data: Any) -> Any:
        return self._call("write", data)

    def flush(self) -> None:
        self._call("flush")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then atomically rename it to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except FileExistsError:  # a file stands where a directory of the path should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
    except OSError as err:  # name the file asked for, not the temp file next to it
        raise type(err)(err.errno, err.strerror, str(path)) from None
    recording = None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            recording = _Recording(f)
            write(recording)
            recording.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = (recording.error if recording is not None else None) or (err if isinstance(err, OSError) else None)
        if cause is not None:
            raise WriteError(path, cause) from err
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch  # here, not at the top: writing a report or a text file needs no torch

    return atomic_write(path, lambda f: torch.save(obj, f))
