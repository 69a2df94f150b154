"""The test's SQLite store, read back and locked: ``run_data`` and :class:`SqliteLock`.

A plain module, not ``conftest``: a test module that imported ``conftest`` got whichever
conftest pytest had loaded last (``tests/distributed`` has its own) when both folders were
collected in one run.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from mlflow.tracking import MlflowClient


def run_data(store: MlflowClient, run_id: str) -> tuple[dict, dict, dict]:
    """Params, latest metrics and user tags (without ``mlflow.*``) of a run."""
    data = store.get_run(run_id).data
    tags = {k: v for k, v in data.tags.items() if not k.startswith("mlflow.")}
    return data.params, data.metrics, tags


class SqliteLock:
    """A second ``sqlite3`` connection holding ``BEGIN EXCLUSIVE`` on a database file.

    A real "database is locked" for every other connection, in this process or any other.
    Note that MLflow's SQL store waits up to 20 s for a lock (``PRAGMA busy_timeout =
    20000``) before it reports "database is locked", so a lock must be held longer than that
    to make a call fail; a shorter one only delays it. Entering takes the lock (waiting for
    other writers to finish first); it is released after ``hold`` seconds (never, with
    ``None``), by :meth:`release`, or on exit, whichever comes first.
    """

    def __init__(self, path: str | Path, hold: float | None = None) -> None:
        self.path = str(path)
        self.hold = hold
        self.released = threading.Event()
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def __enter__(self) -> SqliteLock:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        self._conn = conn
        if self.hold is not None:
            self._timer = threading.Timer(self.hold, self.release)
            self._timer.daemon = True
            self._timer.start()
        return self

    def release(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.execute("ROLLBACK")
                self._conn.close()
                self._conn = None
                self.released.set()

    def __exit__(self, *exc_info: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.release()
