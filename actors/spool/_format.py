"""The journal's format: its version, file names and SQLite schema, and the errors a journal
raises (each with MLflow's error code), and what a journal holds of one run.
"""

from __future__ import annotations

from typing import NamedTuple

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    COULD_NOT_ACQUIRE_LOCK,
    DATA_LOSS,
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_DOES_NOT_EXIST,
)

from actors.queueing._queues import CreateRunCall

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


# The ``meta`` key under which a keeper records the runs it could not end (a JSON list, see
# ``actors.spool._ends``): a journal holding it is not empty, and a replay ends those runs.
ENDS_KEY = "end_runs"


SCHEMA = """
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


def bad(message: str) -> SpoolError:
    return SpoolError(message, error_code=INVALID_PARAMETER_VALUE)


class RunEntry(NamedTuple):
    """One run of a journal: its ID once known, else the creation that makes it."""

    key: str
    run_id: str | None
    create: CreateRunCall | None
    create_key: str | None
    create_attempted: bool
