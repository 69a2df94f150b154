"""The SQL of a write-ahead journal's group commit (:meth:`Spool.commit_group
<actors.spool._spool.Spool.commit_group>`), and of adding a run to a journal.

A group commit holds everything a client logged during one ``journal_interval``, all runs,
and the deletes of what the store acknowledged meanwhile. It runs next to the training loop,
so it makes few statements, each for many rows: every statement lets go of the GIL, and
getting it back behind a busy Python thread costs up to a switch interval (5 ms) each time.
"""

from __future__ import annotations

import sqlite3
from typing import Any, NamedTuple

from actors.queueing._plan import Call
from actors.queueing._queues import CreateRunCall
from actors.spool._codec import dumps

_CALL_COLUMNS = "run_key, kind, payload, metrics, params, tags, datasets"


class GroupWrite(NamedTuple):
    """One run's part of a group commit: the run (by ID, or by its creation) and its calls."""

    key: str
    run_id: str | None
    create: CreateRunCall | None
    calls: list[Call]


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def insert_run(
    db: sqlite3.Connection,
    key: str,
    run_id: str | None,
    create: CreateRunCall | None,
    attempted: bool,
    create_key: str | None = None,
) -> None:
    """Add a run: by its ID, or by its creation (and whether that was attempted; its key is
    ``create_key``, or the creation's own)."""
    db.execute(
        "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key,
            run_id,
            create.experiment_id if create else None,
            create.run_name if create else None,
            create.start_time if create else None,
            dumps([list(pair) for pair in create.tags]) if create else None,
            (create_key or create.create_key) if create else None,
            int(attempted and create is not None),
        ),
    )


def group_commit(
    db: sqlite3.Connection,
    writes: list[GroupWrite],
    rows: list[list[tuple[Any, ...]]],
    deletes: list[int],
    dropped: list[str],
) -> list[list[int]]:
    """Inside a transaction: add each write's run unless the journal has it, append its
    encoded ``rows``; delete the delivered calls (``deletes``) and the runs whose creation
    will never be sent (``dropped``). Returns the new calls' seqs, per write."""
    known: set[str] = set()
    for keys in _chunks([write.key for write in writes], 500):
        marks = ",".join("?" * len(keys))
        found = db.execute(f"SELECT key FROM runs WHERE key IN ({marks})", keys)
        known.update(key for (key,) in found)
    for write in writes:
        if write.key not in known:
            insert_run(db, write.key, write.run_id, write.create, False)
            known.add(write.key)
    flat: list[int] = []
    for chunk in _chunks([row for run_rows in rows for row in run_rows], 1000):
        values = ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
        cursor = db.execute(
            f"INSERT INTO calls ({_CALL_COLUMNS}) VALUES {values}",
            [value for row in chunk for value in row],
        )
        last = int(cursor.lastrowid or 0)  # one statement: its rows' seqs are consecutive
        flat += range(last - len(chunk) + 1, last + 1)
    seqs: list[list[int]] = []
    for run_rows in rows:
        seqs.append(flat[: len(run_rows)])
        flat = flat[len(run_rows) :]
    for chunk in _chunks(deletes, 500):
        db.execute(f"DELETE FROM calls WHERE seq IN ({','.join('?' * len(chunk))})", chunk)
    for key in dropped:
        db.execute("DELETE FROM calls WHERE run_key = ?", (key,))
        db.execute("DELETE FROM runs WHERE key = ? AND run_id IS NULL", (key,))
    return seqs
