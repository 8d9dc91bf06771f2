"""The process's standard streams, as `mcpbill` finds them and as it leaves them.

A script may start it with a stream closed (``>&-``, ``<&-``, ``2>&-``), on a disk that is full
(``>/dev/full``) or on a terminal that cannot show every character (``LC_ALL=C``). Whatever the
streams, a run ends with its own exit status: never a traceback, never Python's 120 for a last
flush that failed.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from typing import Any

from mcpbill_cli.cli.output import exit_code, tell
from mcpbill_cli.errors import FileUnavailable

STDIN, STDOUT, STDERR = 0, 1, 2


class ClosedStream(io.TextIOBase):
    """Stands in for a stream the process was started without (Python leaves it None): each
    write fails as a write to a closed descriptor does, so a result that cannot be printed is
    a coded failure, not a silence."""

    encoding = "utf-8"
    errors = "strict"

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, f"{self.name} is closed", f"<{self.name}>")

    def flush(self) -> None:
        """Nothing is ever held: the interpreter's last flush has nothing to fail on."""


def prepare() -> None:
    """Fill in closed standard streams, and let stdout show any text.

    A closed descriptor gets /dev/null, so no file the run opens takes its number. Then a closed
    stdin reads as /dev/null does (nothing piped in, no terminal to ask on), a closed stdout
    fails each write (:class:`ClosedStream`) and a closed stderr drops what is said: talk is
    best effort. A character the terminal's encoding cannot show (``LC_ALL=C``,
    ``PYTHONIOENCODING=latin-1``) is escaped, ``caf\\xe9``, as ``output.shown`` escapes control
    characters: it failed the command with a UnicodeEncodeError (stderr escapes already)."""
    if sys.stdin is None:
        _hold(STDIN, os.O_RDONLY)
        sys.stdin = open(STDIN, closefd=False)
    if sys.stdout is None:
        _hold(STDOUT, os.O_WRONLY)
        sys.stdout = ClosedStream("stdout")
    if sys.stderr is None:
        _hold(STDERR, os.O_WRONLY)
        sys.stderr = open(STDERR, "w", errors="backslashreplace", closefd=False)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")


def settle(status: Any) -> Any:
    """The run's exit status once stdout and stderr are flushed.

    Output still held that stdout cannot take (a full disk) fails a run that had succeeded:
    FILE_UNAVAILABLE, said on stderr. A reader that left keeps the status (README: it ends the
    run quietly). Either way the descriptor that failed is pointed at /dev/null, so the
    interpreter's own last flush cannot fail again and exit 120."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence(STDOUT)
    except OSError as exc:
        if status:  # the run failed already, and said why
            _silence(STDOUT)
        else:
            status = unwritable(exc)
    try:
        sys.stderr.flush()
    except OSError:
        _silence(STDERR)
    return status


def unwritable(exc: OSError) -> int:
    """Say that stdout failed (FILE_UNAVAILABLE, on stderr) and return its exit status; stdout
    is pointed at /dev/null, as in :func:`settle`."""
    _silence(STDOUT)
    lost = FileUnavailable(f"cannot write to stdout: {exc.strerror or exc}", path="<stdout>")
    tell(lost)
    return exit_code(lost.code)


def _hold(fd: int, flags: int) -> None:
    null = os.open(os.devnull, flags)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def _silence(fd: int) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)
