"""Atomic file writes: a reader sees either the complete old file or the complete new one, never a part.

Every file dit_fast writes (checkpoints, benchmark results, samples) goes through here: the data is
written to a temporary file in the destination's directory (same filesystem, so the rename is atomic),
flushed and fsynced, then moved over the destination with os.replace. On any failure the temporary
file is removed and the error propagates; the destination is untouched. A write that fails because
the disk is full raises DiskFullError (an OSError with errno ENOSPC) saying so, whatever the writer's
own error was (torch.save reports a full disk as "unexpected pos").

- A destination that is a symlink: the link's target is replaced, the link stays.
- File mode: a new file gets what open() would give it (0666 minus the umask); a replaced file keeps
  its mode (mkstemp's 0600 would lock other users of a shared results directory out).
- Temporaries are named `.NAME.RANDOM.dit_fast-HOST-PID.tmp`. A writer killed with SIGKILL cannot
  remove its own: remove_stale_temporaries(directory) removes those whose writer (this host, that pid)
  is dead, never a live process's. The first write into a directory in a process does that for it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import stat
import tempfile
from typing import IO, Callable, Iterator

__all__ = ["atomic_write", "atomic_save", "write_text", "remove_stale_temporaries", "DiskFullError"]

TEMP_SUFFIX = ".tmp"
# Below this many free bytes after a failed write, the disk counts as full (the writer's error may not say).
FULL_DISK_BYTES = 1 << 20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_swept: set[str] = set()  # directories this process has already swept for stale temporaries


class DiskFullError(OSError):
    """A write failed because its filesystem is full; the destination kept its previous content."""


def _host() -> str:
    # Names stay one path component of safe characters whatever the hostname holds.
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _temp_tag(pid: int | None = None) -> str:
    return f".dit_fast-{_host()}-{os.getpid() if pid is None else pid}{TEMP_SUFFIX}"


_TEMP_NAME = re.compile(r"^\..+\.dit_fast-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)" + re.escape(TEMP_SUFFIX) + "$")


def _resolve(path) -> tuple[str, str]:
    """(the file to replace, its directory): a symlink's final target, so the link stays a link."""
    real = os.path.realpath(os.fspath(path))
    return real, os.path.dirname(real)


def _new_temp(path: str, directory: str) -> tuple[int, str]:
    _sweep_once(directory)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=_temp_tag(), dir=directory)
    try:
        os.fchmod(fd, _mode_for(path))
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path, "w") as f: f.write(...)``: path is replaced only if the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path, directory = _resolve(path)
    fd, tmp = _new_temp(path, directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt too: never leave a partial file behind
        _fail(e, tmp, path, directory)
    _fsync_directory(directory)


def atomic_save(path, write: Callable[[str], None]) -> None:
    """For writers that insist on a path (safetensors' save_file): ``write(tmp_path)``, then replace."""
    path, directory = _resolve(path)
    fd, tmp = _new_temp(path, directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path))  # the writer may have made the file anew, with its own mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _fail(e, tmp, path, directory)
    _fsync_directory(directory)


def write_text(path, text: str) -> str:
    with atomic_write(path, "w") as f:
        f.write(text)
    return os.fspath(path)


def remove_stale_temporaries(directory) -> list[str]:
    """Remove this module's temporaries in `directory` whose writer is dead; the paths removed.

    Only names of our own pattern written on this host are considered, and one is removed only when
    os.kill(pid, 0) says no such process: a live writer's temporary (another run saving right now) stays.
    A recycled pid keeps a dead writer's file (the safe side). Old temporaries without a pid stay too.
    """
    directory = os.fspath(directory)
    removed = []
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    host = _host()
    for name in names:
        m = _TEMP_NAME.match(name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        full = os.path.join(directory, name)
        with contextlib.suppress(FileNotFoundError):  # another sweeper got there first
            os.unlink(full)
            removed.append(full)
    return removed


# -- helpers ---------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OverflowError:
        return False
    return True


def _sweep_once(directory: str) -> None:
    if directory not in _swept:
        _swept.add(directory)
        with contextlib.suppress(OSError):
            remove_stale_temporaries(directory)


def _mode_for(path: str) -> int:
    """The mode the destination ends up with: the replaced file's, else 0666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # /proc says it without changing it; os.umask can only be read by setting it (racy with threads).
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fail(error: BaseException, tmp: str, path: str, directory: str):
    """Remove the temporary and re-raise: as DiskFullError when the filesystem is full."""
    free = _free_bytes(directory)  # measured before the temporary's space is given back
    full = isinstance(error, Exception) and _disk_full(error, free)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    if full:
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on the device of {directory} while writing {path} "
            f"({'unknown' if free is None else _size(free)} free; the writer said: "
            f"{type(error).__name__}: {_first_line(error)}). {os.path.basename(path)} keeps its previous "
            "content, if it had one; free some space and run again",
        ) from error
    raise error


def _disk_full(error: BaseException, free: int | None) -> bool:
    seen, depth = error, 0
    while seen is not None and depth < 16:  # the chain of causes, bounded (it can loop)
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    return free is not None and free < FULL_DISK_BYTES


def _free_bytes(directory: str) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "(no message)"


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not every filesystem lets a directory be opened for that.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
