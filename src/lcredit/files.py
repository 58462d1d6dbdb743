"""Every file a run writes is written whole or not at all (README: When something goes wrong).

A file is written to a temporary file in its own directory, flushed to disk and renamed over the
old one: a failure while writing (a full disk, a kill) leaves the previous file as it was.
Lightning's own checkpoint writer stages the file in the system's temporary directory and, when
that is another filesystem, *copies* it over the old checkpoint, truncating it first; runs save
through ``lcredit.callbacks.checkpoint_io.AtomicCheckpointIO`` instead.

A run also keeps a small reserve file in its directory from its start: when the disk fills, the
reserve is given back so that the failure record (results.json) can still be written.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path

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
