"""Files written so a crash never leaves half of one: temp file, fsync, rename, fsync the dir;
and the lock files that keep two processes' read-edit-write cycles of one file apart."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mcpbill_cli.errors import FileUnavailable


@contextmanager
def atomic_writer(path: Path, *, mode: int = 0o644, text: bool = False) -> Iterator[IO[Any]]:
    """Stream into a temp file beside ``path``; it replaces ``path`` in one rename only when
    the block succeeds (fsynced first), and is removed if the block fails.

    Any OSError on the way (no such directory, no permission, a full disk, also while the
    block writes) is FILE_UNAVAILABLE naming ``path``, not the temp file nobody asked for."""
    try:
        with _atomic_writer(path, mode=mode, text=text) as fh:
            yield fh
    except OSError as exc:
        raise unwritable(path, exc) from None


def unwritable(path: Path, exc: OSError) -> FileUnavailable:
    return FileUnavailable(f"cannot write {path}: {exc.strerror or exc}", path=str(path))


@contextmanager
def _atomic_writer(path: Path, *, mode: int, text: bool) -> Iterator[IO[Any]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w" if text else "wb", encoding="utf-8" if text else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` in one rename; the file is created with ``mode``."""
    with atomic_writer(path, mode=mode) as fh:
        fh.write(data)


def write_new_secret(path: Path, data: bytes) -> None:
    """Create ``path`` mode 0600 from the first byte on; refuse to overwrite an existing file
    (FileExistsError, for the caller to word); any other OSError is FILE_UNAVAILABLE, and a
    file made but not filled (a full disk) is removed: never an empty or partial secret."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise
    except OSError as exc:
        raise unwritable(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(path.parent)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise unwritable(path, exc) from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def file_lock(path: Path, *, shared: bool = False, mode: int = 0o644) -> Iterator[None]:
    """Hold a lock on the lock file ``path`` for the block: exclusive for a read-edit-write
    cycle, so a concurrent one waits instead of writing over it from what it read before;
    ``shared`` for readers that must not overlap such a cycle, but may overlap each other.

    The file is made (with ``mode``) when missing and never removed: a process that removed
    it could leave the next two locking different files. The lock goes with the descriptor,
    so a process that dies holding it holds it no more."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    except OSError as exc:
        raise unwritable(path, exc) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
