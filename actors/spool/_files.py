"""A journal's files: finding them, the private folder (0700), the ``flock`` that keeps a
journal to one process, the raw SQLite header and ``-wal`` checks made before SQLite opens
a file, and the removal of journals whose creation was interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import sqlite3
import stat
import struct
import time
import uuid
from pathlib import Path

from actors.spool._format import (
    APPLICATION_ID,
    FORMAT_VERSION,
    NEW_SUFFIX,
    PREFIX,
    READ_VERSIONS,
    SCHEMA,
    SIDE_SUFFIXES,
    STALE_NEW_AGE,
    SUFFIX,
    SpoolCorrupt,
    SpoolGone,
    SpoolLocked,
    SpoolVersion,
    bad,
)
from actors.spool._journal_check import check_wal, loss_message, totals_mismatch

_logger = logging.getLogger("runactors.spool")


def is_journal_name(name: str) -> bool:
    return name.startswith(PREFIX) and name.endswith(SUFFIX)


def spool_files(spool_dir: str | os.PathLike[str]) -> list[Path]:
    """The journals in ``spool_dir`` (by name: ``runactors-*.spool``), oldest first.

    Anything else there (SQLite's ``-wal``/``-shm`` side files, a journal being created,
    foreign files) is not listed and never touched by the journal code.
    """
    found = []
    for path in Path(spool_dir).iterdir():
        if not is_journal_name(path.name):
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


def private_folder(spool_dir: Path) -> None:
    """Create ``spool_dir`` 0700 if missing; warn if an existing one is open to others."""
    try:
        spool_dir.mkdir(mode=0o700, parents=True)
        os.chmod(spool_dir, 0o700)  # mkdir's mode is masked by the umask
    except FileExistsError:
        if not spool_dir.is_dir():
            raise bad(f"spool_dir {spool_dir} exists and is not a folder") from None
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
    loss at the first outage (the probe: :func:`probe_write`). The journal itself is still
    created at the first spool write.
    """
    folder = Path(spool_dir)
    try:
        private_folder(folder)
        probe_write(folder)
    except OSError as exc:
        raise bad(f"spool_dir {folder} cannot be used: {exc}") from None


def probe_write(folder: Path) -> None:
    """Create, write and remove a file in ``folder``; ``OSError`` if a journal could not be
    created there now. The probe is a ``*.spool-new`` file, the name of a journal being
    created: one left by a crash here holds nothing and is cleaned up as such."""
    probe = folder / f"{PREFIX}{uuid.uuid4().hex}{NEW_SUFFIX}"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"probe")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_file(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise SpoolLocked(
                f"Journal {path} is locked by another process (a live client or a replay)."
            ) from None
        raise


def read_header(path: Path) -> tuple[int, int]:
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


def refuse_lost_commits(path: Path) -> None:
    """Refuse a journal whose ``-wal`` holds commits SQLite would silently not read."""
    try:
        loss = check_wal(path)
    except sqlite3.DatabaseError as exc:
        raise SpoolCorrupt(f"Journal {path} is corrupt: {exc}") from None
    except (OSError, struct.error) as exc:
        raise SpoolCorrupt(f"Journal {path}: its -wal file cannot be read: {exc}") from None
    if loss is not None:
        raise SpoolCorrupt(loss_message(path, loss))


def connect(path: Path) -> sqlite3.Connection:
    # mode=rw: SQLite must never create a journal (a missing file is an error, not a new DB).
    connection = sqlite3.connect(
        f"file:{path}?mode=rw", uri=True, isolation_level=None, check_same_thread=False
    )
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


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


def new_journal(folder: Path, tracking_uri: str) -> tuple[Path, int]:
    """A new, empty journal for this process in ``folder`` (created 0700 if missing): its
    path and the fd of its ``flock``.

    The file is made under a temporary name, its schema committed and locked, then
    renamed: a ``runactors-*.spool`` file therefore always has its schema, and is locked
    from the moment it carries that name.
    """
    private_folder(folder)
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
            setup.executescript(f"BEGIN;{SCHEMA}COMMIT;")
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
        fsync_dir(folder)
        return path, fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(new_path)
        os.close(fd)
        raise


def open_journal(path: Path) -> tuple[int, sqlite3.Connection]:
    """An existing journal, locked and checked: the fd of its ``flock`` and a connection.

    Raises :class:`SpoolLocked` if another process holds it, :class:`SpoolGone` if it
    was removed meanwhile, :class:`SpoolCorrupt` or :class:`SpoolVersion` if it cannot be
    read; in every case the file is left as it was.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SpoolGone(f"Journal {path} does not exist (delivered meanwhile?).") from None
    try:
        lock_file(fd, path)
        # Locked: but another replay may have delivered and unlinked the file between our
        # open() and flock(); then the lock is on a file that no longer has this name.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise SpoolGone(f"Journal {path} was delivered by another process meanwhile.")
        application_id, user_version = read_header(path)
        if application_id != APPLICATION_ID:
            raise SpoolCorrupt(f"{path} is an SQLite database but not a runactors journal.")
        if user_version not in READ_VERSIONS:
            raise SpoolVersion(
                f"Journal {path} has format version {user_version}; this runactors reads "
                f"versions {READ_VERSIONS[0]} to {FORMAT_VERSION}. Replay it with a "
                "matching runactors."
            )
        refuse_lost_commits(path)  # before SQLite opens it: its recovery would hide the loss
        try:
            connection = connect(path)
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
        return fd, connection
    except BaseException:
        os.close(fd)
        raise


def write_problems(journal: Path | None, folder: Path, failure: str | None = None) -> list[str]:
    """What keeps a live spool from taking a write now (empty: nothing): its ``journal`` was
    removed (writes would go to a file nobody can replay), its last write ``failure`` (a full
    disk: retried at each commit), or no journal can be created in ``folder`` (proved by a
    probe file, as the client's constructor proved it)."""
    if journal is not None and not journal.exists():
        return [
            f"spool: the journal {journal} was removed: what it holds and what is "
            "spooled next cannot be replayed"
        ]
    if failure is not None and journal is not None:
        return [
            f"spool: writing the journal {journal} failed ({failure}): what was logged since "
            "is only in memory until a write succeeds"
        ]
    if journal is None and not folder.exists():  # made at the first spool write
        parent = next(p for p in folder.parents if p.exists())
        if os.access(parent, os.W_OK | os.X_OK):
            return []
        return [f"spool: cannot create {folder}: {parent} is not writable"]
    try:
        probe_write(folder)
    except OSError as exc:
        return [f"spool: cannot write in {folder}: {exc.strerror or repr(exc)}"]
    return []
