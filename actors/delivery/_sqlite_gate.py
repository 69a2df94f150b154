"""One writer at a time per SQLite file within this process: a lock instead of SQLite's polling.

SQLite lets one connection write a database at a time. Another connection that wants to write
meanwhile waits in SQLite's busy handler, which polls: it sleeps 1, 2, 5, 10 ... up to 100 ms
between looks, so a writer that finishes in 5 ms can leave the next one asleep for 25 ms.
The thread executor's workers are exactly such connections (one per thread, one file), and
measured on the 8 runs x 1,000 steps load they spent a third of the flush asleep.

So runactors' calls to a SQLite store take turns on a lock of this process, one per database
file, around each call (never around the backoff between retries): a thread waiting on it is
woken the moment the writer is done, and meanwhile the GIL is free for the others to plan and
validate. Nothing changes for other processes, which still meet at SQLite's own locks and
busy timeout; nothing changes either for other databases, which need no gate.

The gate only ever saves time, it is never a new way to fail: a call waits for it at most
:data:`GATE_WAIT` seconds (a turn normally takes milliseconds), then goes ahead without it,
to SQLite's own locking, as it would with no gate. So a call that hangs while holding it (a
store on a stalled network file system, say) delays the other runs by a second, no more,
and fails none of them.

Example::

    with database_gate(uri_database_key("sqlite:///mlruns.db")):
        client.set_terminated(run_id)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import sqlalchemy

GATE_WAIT = 1.0  # seconds a call waits for its turn before it goes ahead without it

BUSY_TIMEOUT_ENV = "RUNACTORS_SQLITE_BUSY_TIMEOUT"
DEFAULT_BUSY_TIMEOUT = 20.0  # MLflow's own (its sessions' ``PRAGMA busy_timeout = 20000``)


def busy_timeout_ms() -> int:
    """How long runactors' own SQLite writes (the SQL fast path) wait for a locked database
    before "database is locked", in ms: ``RUNACTORS_SQLITE_BUSY_TIMEOUT`` seconds, else
    MLflow's 20 s, so that they fail exactly when MLflow's own calls would. A shorter wait
    only makes a lock held by another process fail sooner, to be retried (tests use it to
    meet a lock in 1 s instead of 20); MLflow's own calls keep their 20 s."""
    try:
        seconds = float(os.environ.get(BUSY_TIMEOUT_ENV, DEFAULT_BUSY_TIMEOUT))
    except ValueError:
        seconds = DEFAULT_BUSY_TIMEOUT
    if not 0 <= seconds < 1e6:  # negative, NaN, infinite: MLflow's
        seconds = DEFAULT_BUSY_TIMEOUT
    return round(seconds * 1000)


_gates: dict[str, threading.RLock] = {}
_gates_lock = threading.Lock()


def database_key(database: str | None) -> str | None:
    """The file a SQLite database name denotes (absolute, links resolved), or None for an
    in-memory database (private to its connection: nothing to share)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.realpath(database)


def uri_database_key(tracking_uri: str) -> str | None:
    """:func:`database_key` of a ``sqlite://`` tracking URI; None for any other store."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    try:
        return database_key(sqlalchemy.engine.make_url(tracking_uri).database)
    except sqlalchemy.exc.ArgumentError:  # MLflow refuses it when it opens the store
        return None


def _gate(key: str) -> threading.RLock:
    with _gates_lock:
        gate = _gates.get(key)
        if gate is None:
            gate = _gates[key] = threading.RLock()  # reentrant: a call may nest another
        return gate


@contextmanager
def _held(key: str) -> Iterator[None]:
    gate = _gate(key)
    held = gate.acquire(timeout=GATE_WAIT)  # else: SQLite's own locking, as without a gate
    try:
        yield
    finally:
        if held:
            gate.release()


def database_gate(key: str | None) -> AbstractContextManager[None]:
    """Hold the gate of the SQLite file ``key`` (a :func:`database_key` or
    :func:`uri_database_key`) while inside; a no-op for None (no gate: not a SQLite file)."""
    return nullcontext() if key is None else _held(key)


def _after_fork_in_child() -> None:
    # A gate held by a thread of the parent would never be released in the child.
    global _gates_lock
    _gates_lock = threading.Lock()
    _gates.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
