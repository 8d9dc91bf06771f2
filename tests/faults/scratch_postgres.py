"""A throwaway PostgreSQL cluster of a test's own, to restart and kill while calls run.

Never the shared server: ``initdb`` makes a cluster in a temporary directory, listening on a
free port on 127.0.0.1 with its unix socket in that directory. PostgreSQL refuses to run as
root, so when the tests run as root the cluster's commands run as the ``postgres`` OS user
(``runuser``), in a directory that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN_GLOB = "/usr/lib/postgresql/*/bin"
OS_USER = "postgres"


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL's bin directory with initdb and pg_ctl, if any."""
    found = [Path(p) for p in sorted(glob.glob(BIN_GLOB), key=_major)
             if (Path(p) / "initdb").exists() and (Path(p) / "pg_ctl").exists()]
    return found[-1] if found else None


def _major(path: str) -> int:
    name = Path(path).parent.name
    return int(name) if name.isdigit() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ScratchPostgres:
    """One cluster: ``start``, ``restart`` (a clean, fast shutdown), ``stop`` (the same, staying
    down), ``kill`` (an immediate shutdown: the server's processes die without a checkpoint, as
    in a crash) and ``destroy``.
    """

    def __init__(self, binaries: Path, root: Path) -> None:
        self.binaries = binaries
        self.root = root
        self.data = root / "data"
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self, *options: str) -> None:
        """``initdb`` with ``options`` besides this cluster's (``--waldir DIR``, say)."""
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8", *options)

    def start(self) -> None:
        self._pg_ctl("start", "-o", self._options(), "-l", str(self._log))

    def restart(self, *, env: dict[str, str] | None = None) -> None:
        """A clean restart: sessions are told to end, and the server comes back at once (with
        ``env`` added to its environment: libfaketime's, say)."""
        self._pg_ctl("restart", "-m", "fast", "-o", self._options(), "-l", str(self._log),
                     env=env)

    def stop(self) -> None:
        """A clean stop: sessions are told to end, and what was committed is on disk."""
        self._pg_ctl("stop", "-m", "fast")

    def kill(self) -> None:
        """Stop as a crash would (no shutdown checkpoint; recovery runs at the next start)."""
        self._pg_ctl("stop", "-m", "immediate")

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "immediate", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def _log(self) -> Path:
        """The server's own log (``-l``: the server never holds pg_ctl's output open)."""
        return self.root / "server.log"

    def _options(self) -> str:
        return (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                "-c max_connections=100 -c shared_buffers=16MB")

    def _pg_ctl(self, *args: str, check: bool = True, env: dict[str, str] | None = None
                ) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", *args, check=check,
                  env=env)

    def _run(self, program: str, *args: str, check: bool = True,
             env: dict[str, str] | None = None) -> None:
        command = [str(self.binaries / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", OS_USER, "--", *command]
        subprocess.run(command, check=check, stdin=subprocess.DEVNULL,  # noqa: S603
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                       cwd=self.root, env={**os.environ, **(env or {})})


def os_user_ids() -> tuple[int, int] | None:
    """The (uid, gid) the cluster's files belong to when the tests run as root, else None."""
    if os.geteuid() != 0:
        return None
    account = pwd.getpwnam(OS_USER)
    return account.pw_uid, account.pw_gid


def unstarted_cluster() -> ScratchPostgres:
    """A cluster in a new temporary directory the cluster's OS user owns: not yet initdb'd."""
    binaries = server_binaries()
    if binaries is None:
        raise FileNotFoundError(f"no PostgreSQL server binaries under {BIN_GLOB}")
    root = Path(tempfile.mkdtemp(prefix="mcpbill-pg-"))
    owner = os_user_ids()
    if owner is not None:
        os.chown(root, *owner)
    return ScratchPostgres(binaries, root)


@contextmanager
def scratch_postgres() -> Iterator[ScratchPostgres]:
    """A started cluster, destroyed on the way out whatever happened."""
    cluster = unstarted_cluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
