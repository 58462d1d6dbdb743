"""Every file a run writes is written whole or not at all (README: When something goes wrong).

A file is written to a temporary file in its own directory, flushed to disk and renamed over the
old one: a failure while writing (a full disk, a kill) leaves the previous file as it was.
Lightning's own checkpoint writer stages the file in the system's temporary directory and, when
that is another filesystem, *copies* it over the old checkpoint, truncating it first; runs save
through ``lcredit.callbacks.checkpoint_io.AtomicCheckpointIO`` instead.

One process writes into a run directory at a time: :class:`RunLock` holds an exclusive lock on
``<dir>/.lcredit-lock`` for the run's life (the kernel drops it when the process ends, however
it ends, so a dead process's lock is free at once) and names its holder to whoever else tries.

A run also keeps a small reserve file in its directory from its start: when the disk fills, the
reserve is given back so that the failure record (results.json) can still be written.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from lcredit.errors import DirectoryBusy

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock (lcredit's clusters are Linux)
    fcntl = None

RESERVE_NAME = ".lcredit-reserve"
RESERVE_BYTES = 256 * 1024  # a failure record is a few kB; a metrics row or two besides


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, data: bytes | str) -> None:
    """``data`` into ``path`` by a temporary file in the same directory, fsync and rename."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` or an exception it was raised from is an out-of-space error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def reserve(directory: Path) -> Path:
    """A file of RESERVE_BYTES real bytes in ``directory`` (not a sparse one: the space is
    taken now), released by :func:`release` when a failure record needs the room."""
    path = Path(directory) / RESERVE_NAME
    with open(path, "wb") as f:
        f.write(b"\0" * RESERVE_BYTES)
        f.flush()
        os.fsync(f.fileno())
    return path


def release(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(directory) / RESERVE_NAME)


LOCK_NAME = ".lcredit-lock"


class RunLock:
    """An exclusive, non-blocking lock on a run directory for a ``with`` block. A directory
    held by another live process is a DirectoryBusy (a ConfigError) naming it (pid, host,
    since when)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_NAME
        self.fd = None

    def __enter__(self):
        if fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            try:
                holder = json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            since = holder.get("since")
            raise DirectoryBusy(
                f"paths.output_dir={self.path.parent}: another process is running there (pid "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since)) if since else '?'}); "
                f"wait for it to end, or give the run another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.time()}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)  # releases the lock
            self.fd = None
