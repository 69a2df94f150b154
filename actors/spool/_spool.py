"""The spool journal: one SQLite file per live client process holding undeliverable calls.

A journal keeps, per run, the planned calls (:mod:`actors.queueing._plan`) that could not be
delivered, in order, together with what is needed to create the run if its creation is
among them. SQLite (standard library, WAL mode, ``synchronous=FULL``) gives what a journal
needs without hand-rolled files: an append is one transaction that is on disk (fsync)
before :meth:`Spool.append` returns, and "delivered, delete" is one atomic row removal; a
torn last write is rolled back by SQLite's own recovery when the file is next opened. That
recovery also silently drops every commit after a damaged ``-wal`` frame: a ``totals`` row
kept by triggers says what the journal holds, and :mod:`actors.spool._journal_check` reads the
``-wal`` before SQLite does, so such a journal is refused, never delivered in part.

The file is private to its user (folder 0700, files 0600: it holds params and tags), and
locked with ``flock`` for the life of its :class:`Spool`, so that a journal is never
delivered by two processes at once, nor by a replay while its live client still writes it.
The OS drops the lock when the process dies, SIGKILL included.

Its format is in :mod:`actors.spool._format`, its payloads in :mod:`actors.spool._codec`,
its files, locks and checks in :mod:`actors.spool._files`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mlflow.protos.databricks_pb2 import (
    INVALID_STATE,
    IO_ERROR,
)

from actors.delivery._jobs import KINDS, call_counts
from actors.queueing._plan import Call
from actors.queueing._queues import CreateRunCall
from actors.spool._codec import decode_call, encode_call, str_pairs
from actors.spool._files import (
    connect,
    fsync_dir,
    new_journal,
    open_journal,
    side_files,
)
from actors.spool._format import (
    ENDS_KEY,
    RunEntry,
    SpoolCorrupt,
    SpoolError,
    bad,
)
from actors.spool._group_commit import GroupWrite, group_commit, insert_run

# Journals open in this process: a fork child must not keep their locks (see _after_fork).
_OPEN: weakref.WeakSet[Spool] = weakref.WeakSet()
# Connections inherited by fork children: never closed there (closing could checkpoint or
# delete the parent's WAL), never collected either.
_INHERITED: list[Any] = []


class Spool:
    """One journal file, exclusively locked by this object until :meth:`close`.

    Thread-safe: a lock serialises the connection. Use :meth:`create` for a live client's
    new journal and :meth:`open` to deliver an existing one.
    """

    def __init__(self, path: Path, lock_fd: int, connection: sqlite3.Connection) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self._db: sqlite3.Connection | None = connection
        self._mutex = threading.Lock()
        self._pid = os.getpid()
        _OPEN.add(self)

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def create(cls, spool_dir: str | os.PathLike[str], tracking_uri: str) -> Spool:
        """A new, empty journal for this process in ``spool_dir`` (created 0700 if missing).

        The file is made under a temporary name, its schema committed and locked, then
        renamed: a ``runactors-*.spool`` file therefore always has its schema, and is locked
        from the moment it carries that name.
        """
        path, fd = new_journal(Path(spool_dir), tracking_uri)
        try:
            return cls(path, fd, connect(path))
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Spool:
        """An existing journal, locked for delivery.

        Raises :class:`SpoolLocked` if another process holds it, :class:`SpoolGone` if it
        was removed meanwhile, :class:`SpoolCorrupt` or :class:`SpoolVersion` if it cannot be
        read; in every case the file is left as it was.
        """
        path = Path(path)
        fd, connection = open_journal(path)
        return cls(path, fd, connection)

    # -- reading ----------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(f"Journal {self.path} is closed.", error_code=INVALID_STATE)
        if os.getpid() != self._pid:
            raise SpoolError(
                f"Journal {self.path} belongs to process {self._pid}; a fork child cannot use it.",
                error_code=INVALID_STATE,
            )
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction (``synchronous=FULL``: committed means fsynced)."""
        with self._mutex:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise SpoolError(
                    f"Journal {self.path}: write failed: {exc}", error_code=IO_ERROR
                ) from exc

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._mutex:
            try:
                return self._conn().execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise SpoolCorrupt(f"Journal {self.path} cannot be read: {exc}") from None

    def meta(self) -> dict[str, str]:
        """Format version, tracking URI, creating pid and host, creation time."""
        return dict(self._read("SELECT key, value FROM meta"))

    @property
    def tracking_uri(self) -> str:
        return self.meta()["tracking_uri"]

    def _entry(self, row: Sequence[Any]) -> RunEntry:
        key, run_id, experiment_id, run_name, start_time, tags, create_key, attempted = row
        create = None
        if experiment_id is not None:
            try:
                pairs = str_pairs(json.loads(tags))
            except (ValueError, TypeError) as exc:
                raise SpoolCorrupt(
                    f"Journal {self.path}: run {key} has unreadable tags: {exc}"
                ) from None
            create = CreateRunCall(experiment_id, start_time, pairs, run_name)
        return RunEntry(key, run_id, create, create_key, bool(attempted))

    def runs(self) -> list[RunEntry]:
        """Every run in the journal, in the order they were added."""
        rows = self._read("SELECT * FROM runs ORDER BY rowid")
        return [self._entry(row) for row in rows]

    def run(self, key: str) -> RunEntry | None:
        rows = self._read("SELECT * FROM runs WHERE key = ?", (key,))
        return self._entry(rows[0]) if rows else None

    def has_run(self, key: str) -> bool:
        return bool(self._read("SELECT 1 FROM runs WHERE key = ?", (key,)))

    def calls(self, key: str, limit: int | None = None) -> list[tuple[int, Call]]:
        """The run's calls in order, as ``(seq, call)``; the first ``limit`` only if given."""
        rows = self._read(
            "SELECT seq, kind, payload FROM calls WHERE run_key = ? ORDER BY seq LIMIT ?",
            (key, -1 if limit is None else limit),
        )
        out: list[tuple[int, Call]] = []
        for seq, kind, payload in rows:
            try:
                out.append((seq, decode_call(kind, payload)))
            except Exception as exc:
                raise SpoolCorrupt(
                    f"Journal {self.path}: call {seq} of run {key} is unreadable: {exc!r}"
                ) from None
        return out

    def counts(self, key: str | None = None) -> dict[str, int]:
        """Entities per kind waiting in the journal (of one run, or of all), creation tags
        included: what ``status()`` reports as ``spooled``."""
        where, args = ("WHERE run_key = ?", (key,)) if key is not None else ("", ())
        row = self._read(
            f"SELECT SUM(metrics), SUM(params), SUM(tags), SUM(datasets) FROM calls {where}",
            args,
        )[0]
        counts = {kind: int(n or 0) for kind, n in zip(KINDS, row, strict=True)}
        entries = [self.run(key)] if key is not None else self.runs()
        for entry in entries:
            if entry is not None and entry.create is not None and entry.run_id is None:
                counts["tags"] += len(entry.create.tags)
        return counts

    def run_counts(self, keys: Sequence[str]) -> dict[str, dict[str, int]]:
        """Entities per kind of the calls in the journal, per run of ``keys`` that has any."""
        out: dict[str, dict[str, int]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = self._read(
                "SELECT run_key, SUM(metrics), SUM(params), SUM(tags), SUM(datasets) FROM calls"
                f" WHERE run_key IN ({','.join('?' * len(chunk))}) GROUP BY run_key",
                chunk,
            )
            for key, *sums in rows:
                out[key] = {kind: int(n or 0) for kind, n in zip(KINDS, sums, strict=True)}
        return out

    def pending_calls(self, key: str | None = None) -> int:
        """Calls left to make (of one run, or of all), creations included: what a replay's
        progress counts."""
        where, args = ("AND run_key = ?", (key,)) if key is not None else ("", ())
        calls = self._read(f"SELECT COUNT(*) FROM calls WHERE 1 {where}", args)[0][0]
        where = where.replace("run_key", "key")
        creations = self._read(f"SELECT COUNT(*) FROM runs WHERE run_id IS NULL {where}", args)
        return int(calls) + int(creations[0][0])

    def is_empty(self) -> bool:
        return (
            not self._read("SELECT 1 FROM runs LIMIT 1")
            and not self._read("SELECT 1 FROM calls LIMIT 1")
            and self.get_meta(ENDS_KEY) is None
        )

    def get_meta(self, key: str) -> str | None:
        """One value of the journal's ``meta`` table (``None`` if absent)."""
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str | None) -> None:
        """Durably set (or, with ``None``, delete) one value of the ``meta`` table: how the
        keeper records the runs it could not end (``actors.spool._ends``) in a journal of
        any format version, without a schema change."""
        with self._transaction() as db:
            db.execute("DELETE FROM meta WHERE key = ?", (key,))
            if value is not None:
                db.execute("INSERT INTO meta VALUES (?, ?)", (key, value))

    # -- writing ----------------------------------------------------------------------------

    def add_run(
        self,
        key: str,
        *,
        run_id: str | None = None,
        create: CreateRunCall | None = None,
        create_key: str | None = None,
        create_attempted: bool = False,
        calls: Iterable[Call] = (),
    ) -> RunEntry:
        """Record a run (by its ID, or by the creation that makes it) and its first calls,
        in one durable transaction.

        A creation without ``start_time`` gets the current time here, so that the creation
        a replay sends, and the look-up of a creation whose outcome is unknown, are exact.
        ``create_key`` (a new uuid4 if not given) identifies the creation on a server.
        """
        if (run_id is None) == (create is None):
            raise bad(f"run {key}: give exactly one of run_id and create")
        if create is not None:
            if create.start_time is None:
                create = create._replace(start_time=int(time.time() * 1000))
            create_key = create_key or str(uuid.uuid4())
        rows = [self._row(key, call) for call in calls]
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone():
                raise bad(f"run {key} is already in journal {self.path}")
            insert_run(db, key, run_id, create, create_attempted, create_key)
            self._insert(db, rows)
        return RunEntry(key, run_id, create, create_key, create_attempted and create is not None)

    def append(self, key: str, calls: Iterable[Call]) -> list[int]:
        """Append a known run's calls, in order, in one durable transaction; their seqs."""
        rows = [self._row(key, call) for call in calls]
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone():
                raise bad(f"run {key} is not in journal {self.path}: add_run it first")
            return self._insert(db, rows)

    @staticmethod
    def _row(key: str, call: Call) -> tuple[Any, ...]:
        kind, payload = encode_call(call)
        counts = call_counts(call)
        return (key, kind, payload, *(counts[k] for k in KINDS))

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[int]:
        seqs = []
        for row in rows:
            cursor = db.execute(
                "INSERT INTO calls (run_key, kind, payload, metrics, params, tags, datasets)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            seqs.append(int(cursor.lastrowid or 0))
        return seqs

    def commit_group(
        self,
        writes: list[GroupWrite],
        deletes: list[int],
        dropped: list[str],
        attempted: Sequence[tuple[str, Any]] = (),
        created: Sequence[tuple[str, str]] = (),
    ) -> list[list[int]]:
        """A write-ahead journal's group commit, in one durable transaction (see
        :func:`~actors.spool._group_commit.group_commit`); the seqs per write."""
        rows = [[self._row(write.key, call) for call in write.calls] for write in writes]
        with self._transaction() as db:
            for key, create in attempted:  # noted before anything is written for the run
                if db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone():
                    db.execute("UPDATE runs SET create_attempted = 1 WHERE key = ?", (key,))
                else:
                    insert_run(db, key, None, create, True)
            db.executemany("UPDATE runs SET run_id = ? WHERE key = ?", [(i, k) for k, i in created])
            seqs = group_commit(db, writes, rows, deletes, dropped)
            if deletes or dropped or created:
                self._prune(db)
            return seqs

    def mark_create_attempted(self, key: str) -> None:
        """Durably note that the run's creation is being sent: from now on its outcome is
        unknown until :meth:`mark_created`, and it is looked up before being sent again."""
        with self._transaction() as db:
            db.execute("UPDATE runs SET create_attempted = 1 WHERE key = ?", (key,))

    def mark_created(self, key: str, run_id: str) -> None:
        """Durably record the run's ID (its creation is delivered)."""
        with self._transaction() as db:
            db.execute("UPDATE runs SET run_id = ? WHERE key = ?", (run_id, key))
            self._prune(db)

    def remove(self, seqs: Iterable[int]) -> None:
        """Delete delivered calls in one durable transaction; a run with its ID and no calls
        left leaves the journal with them."""
        with self._transaction() as db:
            db.executemany("DELETE FROM calls WHERE seq = ?", [(seq,) for seq in seqs])
            self._prune(db)

    def drop_run(self, key: str) -> int:
        """Delete a run and its calls (its creation failed for good: they cannot be
        delivered, and were reported); the number of calls deleted."""
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM calls WHERE run_key = ?", (key,))
            db.execute("DELETE FROM runs WHERE key = ?", (key,))
            return int(cursor.rowcount)

    @staticmethod
    def _prune(db: sqlite3.Connection) -> None:
        db.execute(
            "DELETE FROM runs WHERE run_id IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM calls WHERE calls.run_key = runs.key)"
        )

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> bool:
        """Release the journal; delete its files if it holds nothing. True if deleted.

        The lock is released last, after the files are gone, so no other process can lock
        and deliver a journal this one is still deleting.
        """
        with self._mutex:
            db, self._db = self._db, None
            if db is None:
                return False
            _OPEN.discard(self)
            try:
                empty = (
                    not db.execute("SELECT 1 FROM runs LIMIT 1").fetchone()
                    and not db.execute("SELECT 1 FROM calls LIMIT 1").fetchone()
                    and not db.execute("SELECT 1 FROM meta WHERE key = ?", (ENDS_KEY,)).fetchone()
                )
            finally:
                db.close()
            try:
                if empty:
                    self.path.unlink(missing_ok=True)
                    for side in side_files(self.path):
                        side.unlink(missing_ok=True)
                    fsync_dir(self.path.parent)
            finally:
                os.close(self._lock_fd)
            return empty

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r})"

    def _forget_in_child(self) -> None:
        """In a fork child: drop the inherited lock fd and connection without closing the
        parent's journal (the parent's lock is on the shared open file description and stays;
        the child's copy of the fd would otherwise keep it alive after the parent dies)."""
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
        if self._db is not None:
            _INHERITED.append(self._db)
        self._db = None
        self._mutex = threading.Lock()


def _after_fork() -> None:
    for spool in list(_OPEN):
        spool._forget_in_child()
    _OPEN.clear()


os.register_at_fork(after_in_child=_after_fork)
