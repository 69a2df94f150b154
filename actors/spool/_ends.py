"""Runs to end after their process died: recorded in a journal, ended once delivered.

When a process with ``spool_dir`` dies without closing, its keeper (:mod:`actors.keeper`)
records in the dead process's journal each run that process created and did not terminate
(:func:`add_pending_ends`), before it delivers anything; :func:`end_pending_runs` then ends
each run whose calls have all left the journal: ``KILLED``, with the time of the death as its
end time, and only if the store still says ``RUNNING`` or ``SCHEDULED`` (a termination that
was delivered, by the process or from the journal, is never overwritten). What cannot be
ended (the store is down) stays recorded, and ``runactors replay`` ends it after delivering
the journal. Ending is idempotent: a record whose run was ended but not yet removed (a crash
in between) finds the run no longer running.

The record is a JSON list under the journal's ``meta`` key :data:`ENDS_KEY`, so every format
version of the journal holds it, and a journal that holds one is not empty.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from mlflow.entities import ViewType

from actors.delivery._create_key import find_created_run, uses_create_key_tag
from actors.delivery._jobs import RetryHook
from actors.delivery._retry import call_with_retry, is_transient
from actors.queueing._queues import CreateRunCall
from actors.spool._codec import str_pairs
from actors.spool._format import ENDS_KEY, SpoolCorrupt
from actors.spool._spool import Spool

OPEN_STATUSES = ("RUNNING", "SCHEDULED")


@dataclass(frozen=True)
class RunEnd:
    """One run to end: by its ID, or by the creation that made it (looked up)."""

    key: str  # the run's key in the journal (its pending label)
    run_id: str | None
    create: CreateRunCall | None
    end_time: int  # ms since the epoch: when the process was seen dead
    status: str = "KILLED"

    def to_json(self) -> dict[str, Any]:
        create = None
        if self.create is not None:
            create = {
                "experiment_id": self.create.experiment_id,
                "start_time": self.create.start_time,
                "tags": [list(pair) for pair in self.create.tags],
                "run_name": self.create.run_name,
                "create_key": self.create.create_key,
            }
        return {
            "key": self.key,
            "run_id": self.run_id,
            "create": create,
            "end_time": self.end_time,
            "status": self.status,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunEnd:
        raw = data.get("create")
        create = None
        if raw is not None:
            create = CreateRunCall(
                str(raw["experiment_id"]),
                None if raw.get("start_time") is None else int(raw["start_time"]),
                str_pairs(raw.get("tags") or []),
                raw.get("run_name"),
                raw.get("create_key"),
            )
        run_id = data.get("run_id")
        return cls(
            str(data["key"]),
            None if run_id is None else str(run_id),
            create,
            int(data["end_time"]),
            str(data.get("status") or "KILLED"),
        )


def pending_ends(spool: Spool) -> list[RunEnd]:
    """The runs this journal says are to be ended, in the order they were recorded."""
    text = spool.get_meta(ENDS_KEY)
    if text is None:
        return []
    try:
        return [RunEnd.from_json(item) for item in json.loads(text)]
    except (ValueError, TypeError, KeyError) as exc:
        raise SpoolCorrupt(
            f"Journal {spool.path}: its runs to end are unreadable: {exc!r}"
        ) from None


def _write(spool: Spool, ends: list[RunEnd]) -> None:
    value = json.dumps([end.to_json() for end in ends]) if ends else None
    spool.set_meta(ENDS_KEY, value)


def add_pending_ends(spool: Spool, ends: Iterable[RunEnd]) -> None:
    """Durably record ``ends`` in the journal (a run already recorded keeps its record)."""
    current = pending_ends(spool)
    keys = {end.key for end in current}
    added = [end for end in ends if end.key not in keys]
    if added:
        _write(spool, current + added)


@dataclass
class EndsOutcome:
    """What :func:`end_pending_runs` did."""

    ended: list[str] = field(default_factory=list)  # run IDs ended now
    left: int = 0  # still recorded: their calls are in the journal, or the store is down
    errors: list[str] = field(default_factory=list)


def find_run(
    client: Any, tracking_uri: str, create: CreateRunCall, exclude: Collection[str] = ()
) -> str | None:
    """The run a creation made, whatever was logged to it since (or None).

    On a tracking server: the exact look-up of its create key. In a local database: a run of
    the experiment with the creation's start time (ms), run name and tags, still running,
    that is not one of ``exclude`` (runs known to be other creations').
    """
    if uses_create_key_tag(tracking_uri) and create.create_key is not None:
        return find_created_run(client, tracking_uri, create, create.create_key, exclude)
    if create.start_time is None:
        return None
    runs = client.search_runs(
        [create.experiment_id],
        filter_string=f"attributes.start_time = {int(create.start_time)}",
        run_view_type=ViewType.ALL,
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    skip = set(exclude)
    for run in runs:
        if run.info.run_id in skip or run.info.status not in OPEN_STATUSES:
            continue
        if create.run_name is not None and run.info.run_name != create.run_name:
            continue
        if all(run.data.tags.get(key) == value for key, value in create.tags):
            return str(run.info.run_id)
    return None


def _end_one(
    client: Any,
    tracking_uri: str,
    end: RunEnd,
    run_id: str | None,
    exclude: set[str],
    retry_timeout: float,
    on_retry: RetryHook | None,
) -> tuple[str | None, bool]:
    """``(run_id, ended_now)``; raises what the store raises past its retries."""
    if run_id is None and end.create is not None:
        run_id = call_with_retry(
            partial(find_run, client, tracking_uri, end.create, exclude), retry_timeout, on_retry
        )
    if run_id is None:  # its creation never reached the store: nothing to end
        return None, False
    run = call_with_retry(partial(client.get_run, run_id), retry_timeout, on_retry)
    if run.info.status not in OPEN_STATUSES:  # terminated already (delivered, or by the process)
        return run_id, False
    call_with_retry(
        partial(client.set_terminated, run_id, end.status, end.end_time), retry_timeout, on_retry
    )
    return run_id, True


def end_pending_runs(
    spool: Spool,
    client: Any,
    tracking_uri: str,
    retry_timeout: float,
    known: Mapping[str, str] | None = None,
    on_retry: RetryHook | None = None,
) -> EndsOutcome:
    """End the journal's recorded runs that have nothing left in it, through ``client`` (an
    ``MlflowClient`` on ``tracking_uri``); ``known`` maps run keys to IDs learnt by delivering
    the journal. Once a call fails past ``retry_timeout`` the rest wait for a later replay."""
    outcome = EndsOutcome()
    ends = pending_ends(spool)
    if not ends:
        return outcome
    known = dict(known or {})
    exclude = set(known.values()) | {end.run_id for end in ends if end.run_id is not None}
    left: list[RunEnd] = []
    down: str | None = None
    for end in ends:
        run_id = end.run_id or known.get(end.key)
        if down is not None or spool.has_run(end.key):  # not delivered yet: ended after
            left.append(end if run_id is None else _with_id(end, run_id))
            continue
        try:
            run_id, ended = _end_one(
                client, tracking_uri, end, run_id, exclude, retry_timeout, on_retry
            )
        except Exception as exc:
            if is_transient(exc):
                down = f"the store was unavailable past retry_timeout ({exc!r})"
                left.append(end if run_id is None else _with_id(end, run_id))
                outcome.errors.append(f"ending run {run_id or end.key}: {down}")
            else:  # a deleted run, say: reported, not kept
                outcome.errors.append(f"ending run {run_id or end.key} failed: {exc!r}")
            continue
        if run_id is not None:
            exclude.add(run_id)
        if ended and run_id is not None:
            outcome.ended.append(run_id)
    if left != ends:
        _write(spool, left)
    outcome.left = len(left)
    return outcome


def _with_id(end: RunEnd, run_id: str) -> RunEnd:
    return RunEnd(end.key, run_id, end.create, end.end_time, end.status)
