"""A throwaway PostgreSQL 15 server for the tests: started in a temp folder on 127.0.0.1 (a
free port) and a Unix socket in that folder, one database made, stopped and removed at the end.

PostgreSQL refuses to run as root: as root, every server command runs as the ``postgres``
user (``runuser -u postgres --``) in a folder owned by it; otherwise as the current user.
The URI it gives (``postgresql+psycopg://...``) is one MLflow accepts as a tracking URI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path(os.environ.get("RUNACTORS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
DATABASE = "mlflow"
_START_TIMEOUT = 60  # seconds: initdb and the first start are slow on a loaded 2-core machine


def missing_binaries() -> str | None:
    """Why the server cannot be started here, or None when it can."""
    for name in ("initdb", "pg_ctl"):
        if not (PG_BIN / name).is_file():
            return f"PostgreSQL server binaries not found ({PG_BIN / name} is missing)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and runuser is missing (PostgreSQL refuses to run as root)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL server in its own temp folder; ``start()`` then ``stop()``."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="runactors-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.folder, user="postgres", group="postgres")

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of the test database over loopback TCP."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def socket_uri(self) -> str:
        """The same database over the Unix socket in the temp folder."""
        return f"postgresql+psycopg://postgres@/{DATABASE}?host={self.folder}&port={self.port}"

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_root else []
        done = subprocess.run(
            [*prefix, *args],
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> None:
        """Initialise the cluster (trust auth, user ``postgres``), start it, make the database."""
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -F -c max_connections=50"
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "server.log"),
            "-t",
            str(_START_TIMEOUT),
            "-w",
            "start",
        )
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")

    def stop(self) -> None:
        """Stop the server (fast shutdown, waiting for it) and remove its folder."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
