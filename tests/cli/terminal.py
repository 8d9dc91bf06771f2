"""Run the installed `mcpbill` as a person or a script meets it: in a pseudo-terminal, or with
stdin from /dev/null. What reads stdin (prompts, `token inspect`) behaves differently in each."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MCPBILL = str(Path(sys.executable).with_name("mcpbill"))


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str  # with a terminal: everything the terminal showed (prompts, talk, data)


def without_terminal(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Run:
    """``mcpbill ARGS`` with stdin from /dev/null and stdout/stderr pipes."""
    proc = subprocess.run([MCPBILL, *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def in_terminal(*args: str, answers: tuple[str, ...] = (), env: dict[str, str] | None = None,
                timeout: float = 60) -> Run:
    """``mcpbill ARGS`` with stdin, stdout and stderr on a pseudo-terminal, its controlling
    terminal (where getpass reads); each answer is typed with Enter once the screen shows a
    prompt ending in ``": "`` (Click writes the question, the reader the space after it, once
    echo is off for a hidden one)."""
    primary, secondary = pty.openpty()
    # setsid -c: a session of its own, with the pseudo-terminal as its controlling terminal
    # (no preexec_fn: Python code between fork and exec is unsafe in a process with threads)
    proc = subprocess.Popen(["setsid", "-w", "-c", MCPBILL, *args], stdin=secondary,
                            stdout=secondary, stderr=secondary, env=env, close_fds=True)
    os.close(secondary)
    screen, pending, deadline = b"", list(answers), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.1)
            chunk = _read(primary) if ready else b""
            if ready and not chunk:
                break  # the process closed the terminal: it has ended
            screen += chunk
            if pending and screen.endswith(b": "):
                os.write(primary, pending.pop(0).encode() + b"\r")
                screen += b"\n"
        else:
            raise TimeoutError(f"mcpbill {' '.join(args)} still running; screen: {screen!r}")
        return Run(proc.wait(timeout=timeout), "", screen.decode(errors="replace"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the other side of the terminal is closed
        return b""
