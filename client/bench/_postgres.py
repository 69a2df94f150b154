"""A throwaway PostgreSQL 15 server for the ``postgres-thread`` scenario and the tests: started
in a temp folder on 127.0.0.1 (a free port), one database made, stopped and removed at the end.

PostgreSQL refuses to run as root: as root, every server command runs as the ``postgres``
user (``runuser -u postgres --``) in a folder owned by it. The tests use it too
(``tests/postgres.py``), without fsync.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

PG_BIN = Path(os.environ.get("RUNACTORS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
DATABASE = "mlflow"
_TIMEOUT = 60  # seconds: initdb and the first start are slow on a loaded 2-core machine


def missing() -> str | None:
    """Why the server cannot be started or reached here, or None when it can."""
    for name in ("initdb", "pg_ctl"):
        if not (PG_BIN / name).is_file():
            return f"PostgreSQL server binaries not found ({PG_BIN / name} is missing)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and runuser is missing (PostgreSQL refuses to run as root)"
    if importlib.util.find_spec("psycopg") is None:
        return "the psycopg driver is not installed (pip install 'psycopg[binary]')"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalPostgres:
    """``with LocalPostgres() as pg:`` a running server, ``pg.uri`` its database."""

    def __init__(self, durable: bool = True, prefix: str = "runactors-bench-pg-") -> None:
        # durable=False (``-F``, commits not fsynced): for tests, which check rows, not
        # durability. The bench keeps durable commits: its figures are a real deployment's.
        self.durable = durable
        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.folder / "data"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.folder, user="postgres", group="postgres")

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_root else []
        done = subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> None:
        """Initialise the cluster (trust auth, user ``postgres``), start it, make the database;
        on any failure, stop and remove what was made."""
        try:
            self._run(
                str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "-E", "UTF8", "--no-sync",
            )  # fmt: skip
            fsync = "" if self.durable else " -F"
            options = f"-h 127.0.0.1 -p {self.port} -k {self.folder}{fsync} -c max_connections=50"
            self._run(
                str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
                "-l", str(self.folder / "server.log"), "-t", str(_TIMEOUT), "-w", "start",
            )  # fmt: skip
            import psycopg

            with psycopg.connect(
                host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                autocommit=True,
            ) as conn:  # fmt: skip
                conn.execute(f"CREATE DATABASE {DATABASE}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (fast shutdown, waiting for it) and remove its folder."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
