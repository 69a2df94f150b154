"""A new SQLite tracking store is created whole or not at all.

MLflow creates a new SQLite store in place: the file appears at once, then its tables and some
twenty alembic migrations are written in many transactions over a second or more. A process
interrupted in between (Ctrl-C during the first ``runactors sweep``, a SIGKILL) leaves a file
with part of the schema, and every later MLflow client fails on it ("table webhooks already
exists", "table _alembic_tmp_experiments already exists") until it is deleted by hand.

So every runactors client that opens a SQLite store whose file does not exist yet (the
executors' clients, worker processes, replay, the sweep, the bench) first has MLflow create
the store in a temporary file of the same folder, then links it into place (``os.link``: it
never replaces a file that appeared meanwhile). The store's path holds no database or a
complete one, whenever the process is stopped. Processes creating the same store take turns
on a lock file (``flock``, released by the kernel when a process dies), so that they do not
each build the schema. MLflow's "Creating initial MLflow database tables" lines of this
creation are not logged: the caller says what it does.

A process killed during the creation leaves its temporary file
(``.mlflow.db.runactors-PID-XXXXXXXX.creating``), removed by the next creation in that
folder once it is :data:`STALE_SECONDS` old, or safe to delete.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STALE_SECONDS = 600.0  # a creation takes seconds: a temporary file this old was abandoned

# MLflow's loggers that announce a creation (MLflow's own, alembic's migrations).
_CREATION_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")


def _database_path(tracking_uri: str) -> str | None:
    """The file of a ``sqlite:`` URI, or None (another store, an in-memory database)."""
    if not tracking_uri.lower().startswith("sqlite"):
        return None
    import sqlalchemy

    try:
        database = sqlalchemy.engine.make_url(tracking_uri).database
    except sqlalchemy.exc.ArgumentError:
        return None  # MLflow refuses it when it opens the store
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database)


class _ThisThread(logging.Filter):
    """Drops the records that the threads in ``threads`` log."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.threads


_quiet = _ThisThread()
for _name in _CREATION_LOGGERS:
    logging.getLogger(_name).addFilter(_quiet)


@contextmanager
def _quiet_creation() -> Iterator[None]:
    """Within the block, MLflow's creation lines from this thread are not logged."""
    ident = threading.get_ident()
    _quiet.threads.add(ident)
    try:
        yield
    finally:
        _quiet.threads.discard(ident)


@contextmanager
def _creators_take_turns(path: str) -> Iterator[None]:
    """Hold an exclusive lock on a lock file for ``path`` (in the temp folder, as MLflow's
    own initialisation lock): one creator at a time, across threads and processes. Without
    a usable temp folder, no lock: the link still keeps the store whole."""
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:24]
    lock_path = os.path.join(tempfile.gettempdir(), f"runactors-create-{digest}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_stale(path: str) -> None:
    """Remove temporary files of creations abandoned long ago (their process was killed)."""
    folder, name = os.path.split(path)
    pattern = os.path.join(glob.escape(folder), f".{glob.escape(name)}.runactors-*.creating*")
    now = time.time()
    for stale in glob.glob(pattern):
        try:
            if now - os.stat(stale).st_mtime > STALE_SECONDS:
                os.unlink(stale)
        except OSError:
            pass


def _build_schema(tracking_uri: str, temporary: str) -> None:
    """Have MLflow create its store (schema and default experiment, as its clients make
    them) in ``temporary``, then close every connection to it."""
    import sqlalchemy
    from mlflow.tracking import MlflowClient

    url = sqlalchemy.engine.make_url(tracking_uri).set(database=temporary)
    uri = url.render_as_string(hide_password=False)
    store: Any = None
    try:
        with _quiet_creation():
            store = MlflowClient(tracking_uri=uri)._tracking_client.store  # built here
    finally:
        # MLflow caches one engine per URI: none may keep a connection to this file, which
        # is about to be the store under another name (its journal would be misnamed).
        engines = getattr(type(store), "_engine_map", None) if store is not None else None
        if isinstance(engines, dict):
            engines.pop(uri, None)
        engine = getattr(store, "engine", None)
        if engine is not None:
            engine.dispose()


def create_sqlite_store(tracking_uri: str) -> bool:
    """Create the SQLite store of ``tracking_uri`` if its file does not exist yet, whole or
    not at all (see the module); True if this call created it.

    Any other store, and a SQLite file that exists (complete or not: never touched), is left
    to MLflow. Raises what MLflow raises when it cannot create the store.
    """
    path = _database_path(tracking_uri)
    if path is None or os.path.exists(path):
        return False
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)  # as MLflow makes it
    with _creators_take_turns(path):
        if os.path.exists(path):  # made by another creator meanwhile
            return False
        _remove_stale(path)
        temporary = os.path.join(
            folder,
            f".{os.path.basename(path)}.runactors-{os.getpid()}-{uuid.uuid4().hex[:8]}.creating",
        )
        try:
            _build_schema(tracking_uri, temporary)
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False  # another process's store: it stays
            except OSError:
                # A file system without hard links: a rename, which would replace a file
                # made in the instant since the look (by a creator not taking turns).
                if os.path.exists(path):
                    return False
                os.rename(temporary, path)
            return True
        finally:
            for leftover in (temporary, temporary + "-journal"):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
