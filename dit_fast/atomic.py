"""Atomic file writes: a reader sees either the complete old file or the complete new one, never a part.

Every file dit_fast writes (checkpoints, benchmark results, samples) goes through here: the data is
written to a temporary file in the destination's directory (same filesystem, so the rename is atomic),
flushed and fsynced, then moved over the destination with os.replace. On any failure the temporary
file is removed and the original exception propagates; the destination is untouched.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Callable, Iterator

__all__ = ["atomic_write", "atomic_save", "write_text"]


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path, "w") as f: f.write(...)``: path is replaced only if the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave a partial file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def atomic_save(path, write: Callable[[str], None]) -> None:
    """For writers that insist on a path (safetensors' save_file): ``write(tmp_path)``, then replace."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def write_text(path, text: str) -> str:
    with atomic_write(path, "w") as f:
        f.write(text)
    return os.fspath(path)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not every filesystem lets a directory be opened for that.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
