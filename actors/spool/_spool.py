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

Payloads are JSON (NaN, infinities and -0.0 round-trip exactly; numpy scalars become
Python numbers); datasets go through MLflow's protobuf. Nothing is pickled: reading a
journal never executes code.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import logging
import numbers
import os
import socket
import sqlite3
import stat
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from mlflow.entities import DatasetInput
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    COULD_NOT_ACQUIRE_LOCK,
    DATA_LOSS,
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    IO_ERROR,
    RESOURCE_DOES_NOT_EXIST,
)
from mlflow.protos.service_pb2 import DatasetInput as DatasetInputProto

from actors.delivery._jobs import KINDS, call_counts
from actors.queueing._plan import (
    Call,
    CreateRunCall,
    LogBatchCall,
    LogInputsCall,
    SetTerminatedCall,
)
from actors.spool._journal_check import check_wal, loss_message, totals_mismatch

_logger = logging.getLogger(__name__)

# 2: the ``totals`` row, kept by triggers, says what the journal holds (see _wal_check).
# Version 1 (no totals) is still read; its -wal is checked all the same.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
# PRAGMA application_id of a runactors journal ("RAJ1"): tells a journal from any other
# SQLite database that happens to carry the journal's name.
APPLICATION_ID = 0x52414A31
PREFIX = "runactors-"
SUFFIX = ".spool"
# A journal being created: schema written, not yet renamed to its final name. Never holds
# data, so a stale one (its creator died) may be removed by whoever can lock it.
NEW_SUFFIX = ".spool-new"
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
STALE_NEW_AGE = 60.0  # seconds

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    key TEXT PRIMARY KEY,
    run_id TEXT,
    experiment_id TEXT,
    run_name TEXT,
    start_time INTEGER,
    tags TEXT,
    create_key TEXT,
    create_attempted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE calls (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_key TEXT NOT NULL REFERENCES runs(key),
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    metrics INTEGER NOT NULL,
    params INTEGER NOT NULL,
    tags INTEGER NOT NULL,
    datasets INTEGER NOT NULL
);
CREATE INDEX calls_by_run ON calls (run_key, seq);
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    runs INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    metrics INTEGER NOT NULL,
    params INTEGER NOT NULL,
    tags INTEGER NOT NULL,
    datasets INTEGER NOT NULL
);
INSERT INTO totals VALUES (0, 0, 0, 0, 0, 0, 0);
CREATE TRIGGER runs_in AFTER INSERT ON runs BEGIN UPDATE totals SET runs = runs + 1; END;
CREATE TRIGGER runs_out AFTER DELETE ON runs BEGIN UPDATE totals SET runs = runs - 1; END;
CREATE TRIGGER calls_in AFTER INSERT ON calls BEGIN
    UPDATE totals SET calls = calls + 1, metrics = metrics + NEW.metrics,
        params = params + NEW.params, tags = tags + NEW.tags, datasets = datasets + NEW.datasets;
END;
CREATE TRIGGER calls_out AFTER DELETE ON calls BEGIN
    UPDATE totals SET calls = calls - 1, metrics = metrics - OLD.metrics,
        params = params - OLD.params, tags = tags - OLD.tags, datasets = datasets - OLD.datasets;
END;
"""


class SpoolError(MlflowException):
    """A journal cannot be used; the message names the file."""


class SpoolLocked(SpoolError):
    """Another process (a live client or a replay) holds the journal."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=COULD_NOT_ACQUIRE_LOCK)


class SpoolCorrupt(SpoolError):
    """The file is not a readable runactors journal (corrupt, truncated, foreign)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=DATA_LOSS)


class SpoolVersion(SpoolError):
    """The journal was written in a format version this code does not read."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_STATE)


class SpoolGone(SpoolError):
    """The journal disappeared before it could be locked (another replay delivered it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=RESOURCE_DOES_NOT_EXIST)


def _bad(message: str) -> SpoolError:
    return SpoolError(message, error_code=INVALID_PARAMETER_VALUE)


class RunEntry(NamedTuple):
    """One run of a journal: its ID once known, else the creation that makes it."""

    key: str
    run_id: str | None
    create: CreateRunCall | None
    create_key: str | None
    create_attempted: bool


# -- payloads ---------------------------------------------------------------------------------


def _number(value: Any) -> Any:
    """JSON's ``default``: numpy scalars and other real numbers as Python numbers."""
    item = getattr(value, "item", None)
    if item is not None and not isinstance(value, str | bytes):
        value = item()
        if isinstance(value, bool | int | float):
            return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{type(value).__name__} {value!r} cannot be written to a journal")


def _dumps(payload: Any) -> str:
    # ensure_ascii keeps any str (lone surrogates included) storable as UTF-8 text;
    # allow_nan writes NaN/Infinity, which json.loads reads back as the same floats.
    return json.dumps(payload, default=_number, ensure_ascii=True, allow_nan=True)


def _dataset_out(dataset: Any) -> str:
    if not isinstance(dataset, DatasetInput):
        raise _bad(f"a journal stores mlflow.entities.DatasetInput, not {type(dataset).__name__}")
    return base64.b64encode(dataset.to_proto().SerializeToString()).decode("ascii")


def _dataset_in(text: str) -> DatasetInput:
    proto = DatasetInputProto()
    proto.ParseFromString(base64.b64decode(text, validate=True))
    return DatasetInput.from_proto(proto)


def encode_call(call: Call) -> tuple[str, str]:
    """``(kind, payload)`` of one planned call (not a creation: that lives in ``runs``)."""
    if isinstance(call, LogBatchCall):
        return "log_batch", _dumps(
            {
                "metrics": [list(row) for row in call.metrics],
                "params": [list(pair) for pair in call.params],
                "tags": [list(pair) for pair in call.tags],
            }
        )
    if isinstance(call, LogInputsCall):
        return "log_inputs", _dumps({"datasets": [_dataset_out(d) for d in call.datasets]})
    if isinstance(call, SetTerminatedCall):
        return "set_terminated", _dumps({"status": call.status, "end_time": call.end_time})
    if isinstance(call, CreateRunCall):
        raise _bad("a creation is recorded with add_run(create=...), not appended as a call")
    raise _bad(f"a journal cannot store {type(call).__name__}")


def _pairs(items: Any) -> list[tuple[str, str]]:
    return [(str(key), str(value)) for key, value in items]


def decode_call(kind: str, payload: str) -> Call:
    """The inverse of :func:`encode_call`; raises ``ValueError`` on anything malformed."""
    data = json.loads(payload)
    if kind == "log_batch":
        metrics = [
            (str(k), v, int(ts), int(step), model_id, ds_name, ds_digest)
            for k, v, ts, step, model_id, ds_name, ds_digest in data["metrics"]
        ]
        return LogBatchCall(metrics, _pairs(data["params"]), _pairs(data["tags"]))
    if kind == "log_inputs":
        return LogInputsCall([_dataset_in(text) for text in data["datasets"]])
    if kind == "set_terminated":
        return SetTerminatedCall(data["status"], data["end_time"])
    raise ValueError(f"unknown call kind {kind!r}")


# -- files, modes, locks ----------------------------------------------------------------------


def _is_journal_name(name: str) -> bool:
    return name.startswith(PREFIX) and name.endswith(SUFFIX)


def spool_files(spool_dir: str | os.PathLike[str]) -> list[Path]:
    """The journals in ``spool_dir`` (by name: ``runactors-*.spool``), oldest first.

    Anything else there (SQLite's ``-wal``/``-shm`` side files, a journal being created,
    foreign files) is not listed and never touched by the journal code.
    """
    found = []
    for path in Path(spool_dir).iterdir():
        if not _is_journal_name(path.name):
            continue
        try:
            info = path.stat()
        except FileNotFoundError:  # delivered and removed by another process meanwhile
            continue
        if stat.S_ISREG(info.st_mode):
            found.append((info.st_mtime, path.name, path))
    return [path for _, _, path in sorted(found)]


def side_files(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in SIDE_SUFFIXES]


def _private_folder(spool_dir: Path) -> None:
    """Create ``spool_dir`` 0700 if missing; warn if an existing one is open to others."""
    try:
        spool_dir.mkdir(mode=0o700, parents=True)
        os.chmod(spool_dir, 0o700)  # mkdir's mode is masked by the umask
    except FileExistsError:
        if not spool_dir.is_dir():
            raise _bad(f"spool_dir {spool_dir} exists and is not a folder") from None
        mode = spool_dir.stat().st_mode & 0o777
        if mode & 0o077:
            _logger.warning(
                "Spool folder %s is accessible to other users (mode %03o); its journals "
                "hold params and tags and are private (0600), but consider chmod 700.",
                spool_dir,
                mode,
            )


def check_spool_dir(spool_dir: str | os.PathLike[str]) -> None:
    """Make ``spool_dir`` (0700, parents too) and prove a journal can be created in it.

    Called when a client is made, so that a folder that cannot be used (under ``/proc``,
    below a regular file, read-only) is an error of the constructor naming the path, not a
    loss at the first outage. The probe is a ``*.spool-new`` file, the name of a journal
    being created: one left by a crash here holds nothing and is cleaned up as such. The
    journal itself is still created at the first spool write.
    """
    folder = Path(spool_dir)
    try:
        _private_folder(folder)
        probe = folder / f"{PREFIX}{uuid.uuid4().hex}{NEW_SUFFIX}"
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise _bad(f"spool_dir {folder} cannot be used: {exc}") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise SpoolLocked(
                f"Journal {path} is locked by another process (a live client or a replay)."
            ) from None
        raise


def _read_header(path: Path) -> tuple[int, int]:
    """``(application_id, user_version)`` from the SQLite header, read without SQLite.

    Reading the raw header first means a foreign or damaged file is rejected before SQLite
    opens it (which could create side files next to it).
    """
    with open(path, "rb") as handle:
        header = handle.read(100)
        size = os.fstat(handle.fileno()).st_size
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise SpoolCorrupt(f"{path} is not a runactors journal (not an SQLite file, or cut short).")
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    pages, change, valid_for = struct.unpack(">I", header[28:32])[0], header[24:28], header[92:96]
    if change == valid_for and size < pages * page_size:
        raise SpoolCorrupt(
            f"Journal {path} is truncated: {size} bytes where its header says {pages * page_size}."
        )
    user_version = struct.unpack(">I", header[60:64])[0]
    application_id = struct.unpack(">I", header[68:72])[0]
    return application_id, user_version


def _check_wal(path: Path) -> None:
    """Refuse a journal whose ``-wal`` holds commits SQLite would silently not read."""
    try:
        loss = check_wal(path)
    except sqlite3.DatabaseError as exc:
        raise SpoolCorrupt(f"Journal {path} is corrupt: {exc}") from None
    except (OSError, struct.error) as exc:
        raise SpoolCorrupt(f"Journal {path}: its -wal file cannot be read: {exc}") from None
    if loss is not None:
        raise SpoolCorrupt(loss_message(path, loss))


def _connect(path: Path) -> sqlite3.Connection:
    # mode=rw: SQLite must never create a journal (a missing file is an error, not a new DB).
    connection = sqlite3.connect(
        f"file:{path}?mode=rw", uri=True, isolation_level=None, check_same_thread=False
    )
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


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
        folder = Path(spool_dir)
        _private_folder(folder)
        name = f"{PREFIX}{uuid.uuid4().hex}"
        new_path, path = folder / (name + NEW_SUFFIX), folder / (name + SUFFIX)
        fd = os.open(new_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            setup = sqlite3.connect(f"file:{new_path}?mode=rw", uri=True, isolation_level=None)
            try:
                setup.execute("PRAGMA synchronous=FULL")
                setup.execute(f"PRAGMA application_id={APPLICATION_ID}")
                setup.execute(f"PRAGMA user_version={FORMAT_VERSION}")
                setup.executescript(f"BEGIN;{_SCHEMA}COMMIT;")
                meta = {
                    "format_version": str(FORMAT_VERSION),
                    "tracking_uri": tracking_uri,
                    "pid": str(os.getpid()),
                    "host": socket.gethostname(),
                    "created": str(time.time()),
                }
                setup.execute("BEGIN")
                setup.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                setup.execute("COMMIT")
                # Persistent in the file: every later connection writes through the WAL.
                setup.execute("PRAGMA journal_mode=WAL")
            finally:
                setup.close()
            os.rename(new_path, path)
            _fsync_dir(folder)
            return cls(path, fd, _connect(path))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(new_path)
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
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SpoolGone(f"Journal {path} does not exist (delivered meanwhile?).") from None
        try:
            _lock(fd, path)
            # Locked: but another replay may have delivered and unlinked the file between our
            # open() and flock(); then the lock is on a file that no longer has this name.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                raise SpoolGone(f"Journal {path} was delivered by another process meanwhile.")
            application_id, user_version = _read_header(path)
            if application_id != APPLICATION_ID:
                raise SpoolCorrupt(f"{path} is an SQLite database but not a runactors journal.")
            if user_version not in READ_VERSIONS:
                raise SpoolVersion(
                    f"Journal {path} has format version {user_version}; this runactors reads "
                    f"versions {READ_VERSIONS[0]} to {FORMAT_VERSION}. Replay it with a "
                    "matching runactors."
                )
            _check_wal(path)  # before SQLite opens it: its recovery would hide the loss
            try:
                connection = _connect(path)
            except sqlite3.DatabaseError as exc:
                raise SpoolCorrupt(f"Journal {path} is corrupt: {exc}") from None
            try:
                check = connection.execute("PRAGMA quick_check").fetchall()
                if check != [("ok",)]:
                    raise SpoolCorrupt(f"Journal {path} is corrupt: {check[0][0]}")
                mismatch = totals_mismatch(connection) if user_version >= 2 else None
                if mismatch is not None:
                    raise SpoolCorrupt(f"Journal {path} is damaged: {mismatch}")
            except sqlite3.DatabaseError as exc:
                connection.close()
                raise SpoolCorrupt(f"Journal {path} is corrupt: {exc}") from None
            except BaseException:
                connection.close()
                raise
            return cls(path, fd, connection)
        except BaseException:
            os.close(fd)
            raise

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
                pairs = _pairs(json.loads(tags))
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

    def pending_calls(self, key: str | None = None) -> int:
        """Calls left to make (of one run, or of all), creations included: what a replay's
        progress counts."""
        where, args = ("AND run_key = ?", (key,)) if key is not None else ("", ())
        calls = self._read(f"SELECT COUNT(*) FROM calls WHERE 1 {where}", args)[0][0]
        where = where.replace("run_key", "key")
        creations = self._read(f"SELECT COUNT(*) FROM runs WHERE run_id IS NULL {where}", args)
        return int(calls) + int(creations[0][0])

    def is_empty(self) -> bool:
        return not self._read("SELECT 1 FROM runs LIMIT 1") and not self._read(
            "SELECT 1 FROM calls LIMIT 1"
        )

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
            raise _bad(f"run {key}: give exactly one of run_id and create")
        if create is not None:
            if create.start_time is None:
                create = create._replace(start_time=int(time.time() * 1000))
            create_key = create_key or str(uuid.uuid4())
        rows = [self._row(key, call) for call in calls]
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone():
                raise _bad(f"run {key} is already in journal {self.path}")
            db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    run_id,
                    create.experiment_id if create else None,
                    create.run_name if create else None,
                    create.start_time if create else None,
                    _dumps([list(pair) for pair in create.tags]) if create else None,
                    create_key if create else None,
                    int(create_attempted and create is not None),
                ),
            )
            self._insert(db, rows)
        return RunEntry(key, run_id, create, create_key, create_attempted and create is not None)

    def append(self, key: str, calls: Iterable[Call]) -> list[int]:
        """Append a known run's calls, in order, in one durable transaction; their seqs."""
        rows = [self._row(key, call) for call in calls]
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone():
                raise _bad(f"run {key} is not in journal {self.path}: add_run it first")
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
                empty = not db.execute("SELECT 1 FROM runs LIMIT 1").fetchone() and not (
                    db.execute("SELECT 1 FROM calls LIMIT 1").fetchone()
                )
            finally:
                db.close()
            try:
                if empty:
                    self.path.unlink(missing_ok=True)
                    for side in side_files(self.path):
                        side.unlink(missing_ok=True)
                    _fsync_dir(self.path.parent)
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


def remove_stale_new(spool_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete journals whose creation was interrupted (``*.spool-new`` that nobody holds).

    Such a file never held data: calls are only written after the rename to ``.spool``.
    """
    removed = []
    for path in Path(spool_dir).iterdir():
        if not (path.name.startswith(PREFIX) and path.name.endswith(NEW_SUFFIX)):
            continue
        try:
            # A creation takes milliseconds; a young file may be one whose creator has not
            # locked it yet.
            if time.time() - path.stat().st_mtime < STALE_NEW_AGE:
                continue
        except FileNotFoundError:
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            path.unlink(missing_ok=True)
            for side in side_files(path):
                side.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


__all__ = [
    "FORMAT_VERSION",
    "RunEntry",
    "Spool",
    "SpoolCorrupt",
    "SpoolError",
    "SpoolGone",
    "SpoolLocked",
    "SpoolVersion",
    "check_spool_dir",
    "decode_call",
    "encode_call",
    "remove_stale_new",
    "spool_files",
]
