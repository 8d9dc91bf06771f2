"""A small real filesystem (a tmpfs) that a test fills to its last byte and frees again.

Mounting needs root. Under ``CI=true`` (CI runs as root) a machine that cannot mount fails the
test, so the full-disk tests can never pass by being skipped; elsewhere they are skipped with
the reason.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


class SmallDisk:
    """A mounted tmpfs: ``fill()`` takes its last byte, ``free()`` gives the room back."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self._filler = mount / "filler"

    def fill(self) -> None:
        """Write one file until the disk refuses (ENOSPC): big blocks, then single pages."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for block in (1 << 16, 1 << 12):
                try:
                    while True:
                        os.write(fd, b"\0" * block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc  # noqa: PT017 - no room for a block
        finally:
            os.close(fd)

    def free(self) -> None:
        self._filler.unlink()

    def files(self) -> dict[str, bytes]:
        """Every file under the mount but the filler, with its bytes (but an edit's empty
        ``.lock`` file, which stays beside the pricing file once made: it holds no data)."""
        return {str(p.relative_to(self.mount)): p.read_bytes()
                for p in sorted(self.mount.rglob("*"))
                if p.is_file() and p != self._filler and p.suffix != ".lock"}


@contextmanager
def small_disk(mount: Path, size: str, *, owner: tuple[int, int] | None = None
               ) -> Iterator[SmallDisk]:
    """A tmpfs of ``size`` (``mount -o size=``) on the existing empty directory ``mount``,
    owned by ``owner`` (uid, gid) if given; unmounted on the way out."""
    options = f"size={size}"
    if owner is not None:
        options += f",uid={owner[0]},gid={owner[1]},mode=0700"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",  # noqa: S607
                              str(mount)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs here: {mounted.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI runs as root and must run the full-disk tests)")
        pytest.skip(reason)
    try:
        yield SmallDisk(mount)
    finally:
        subprocess.run(["umount", str(mount)], check=False)  # noqa: S607


@contextmanager
def small_disk_in_temp(size: str) -> Iterator[SmallDisk]:
    """A tmpfs of ``size`` on a new temporary directory, removed afterwards."""
    mount = Path(tempfile.mkdtemp(prefix="mcpbill-full-"))
    try:
        with small_disk(mount, size) as disk:
            yield disk
    finally:
        mount.rmdir()
