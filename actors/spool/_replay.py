"""Delivering a journal: each run's spooled calls, in order, each exactly once in the store.

Per run: if its ID is unknown, the creation is resolved first (looked up if its outcome is
unknown, else sent, with the attempt recorded durably *before* it is sent), and the ID is
recorded durably. Then each call is made with
:func:`~actors.delivery._retry.call_with_retry` and its
row removed right after it succeeded. A crash between the two re-sends that one call on the
next delivery, which stores nothing twice: MLflow's stores ignore a metric point already
stored (same key, step, timestamp and value), an identical param is accepted again, tags
and termination overwrite with the same values, and an input already linked is reused.

A run whose call fails permanently (or past ``retry_timeout``) stops there, its remaining
calls kept in order; the other runs go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from actors.delivery._attempts import CreationFailed, create_run, creation_error, creation_failed
from actors.delivery._create_key import creation_with_key, find_created_run
from actors.delivery._dispatch import fast_path_call, invoke, invoke_fast
from actors.delivery._fast_path import client_fast_path, log_batch_is_mlflows
from actors.delivery._jobs import KINDS, JobResult, RetryHook, call_counts, empty_counts
from actors.delivery._retry import call_with_retry, is_transient
from actors.delivery._sqlite_gate import uri_database_key
from actors.queueing._plan import Call, LogBatchCall, SetTerminatedCall, call_kind
from actors.spool._format import RunEntry, SpoolCorrupt, SpoolError
from actors.spool._spool import Spool

# (run key, what the call delivered: entities per kind) after each delivered call or creation
ProgressHook = Callable[[str, dict[str, int]], None]

_CHUNK = 64  # calls read from the journal at a time: a long journal is never all in memory


@dataclass
class RunDelivery:
    """What one run's delivery did."""

    key: str
    run_id: str | None = None
    created: bool = False
    calls: int = 0
    delivered: dict[str, int] = field(default_factory=empty_counts)
    left: dict[str, int] = field(default_factory=empty_counts)
    calls_left: int = 0
    error: str | None = None
    transient: bool = False  # the error is transient: a later delivery may succeed
    terminated: bool = False  # its set_terminated was delivered: the run is ended


@dataclass
class DeliverySummary:
    """What delivering one journal did, run by run."""

    runs: list[RunDelivery] = field(default_factory=list)

    @property
    def delivered(self) -> dict[str, int]:
        return {kind: sum(run.delivered[kind] for run in self.runs) for kind in KINDS}

    @property
    def left(self) -> dict[str, int]:
        return {kind: sum(run.left[kind] for run in self.runs) for kind in KINDS}

    @property
    def calls(self) -> int:
        return sum(run.calls for run in self.runs)

    @property
    def calls_left(self) -> int:
        return sum(run.calls_left for run in self.runs)

    @property
    def errors(self) -> list[str]:
        return [f"run {run.key}: {run.error}{_kept(run)}" for run in self.runs if run.error]


def _kept(run: RunDelivery) -> str:
    """What became of a run whose creation did not go through: it stays, for a later try."""
    if run.run_id is not None:
        return ""
    more = run.calls_left - 1
    calls = f" and {more} more call{'s' * (more != 1)}" if more else ""
    return f"; its creation{calls} stay in the journal"


def resolve_creation(
    spool: Spool,
    entry: RunEntry,
    client: Any,
    tracking_uri: str,
    retry_timeout: float,
    on_retry: RetryHook | None = None,
    exclude: frozenset[str] = frozenset(),
) -> tuple[str, bool]:
    """The run's ID, creating the run if it does not exist yet: ``(run_id, created_now)``.

    Every attempt is recorded durably before it is sent; an attempt whose outcome is unknown
    (recorded by this or an earlier process, then failed, timed out or was killed) is looked
    up before anything is sent again, so a retry never makes a second run.
    """
    create, create_key = entry.create, entry.create_key
    if create is None or create_key is None:
        raise ValueError(f"run {entry.key} has neither an ID nor a creation")
    attempted = entry.create_attempted
    to_send = creation_with_key(tracking_uri, create, create_key)

    failed: BaseException | None = None  # the creation's last error (not its look-up's)
    looked_up: BaseException | None = None  # the look-up's, if the last attempt ended in it

    def attempt() -> tuple[str, bool]:
        nonlocal attempted, failed, looked_up
        looked_up = None
        if attempted:
            try:
                found = find_created_run(client, tracking_uri, create, create_key, exclude)
            except Exception as exc:
                looked_up = exc
                raise
            if found is not None:
                return found, False
        else:
            spool.mark_create_attempted(entry.key)
            attempted = True
        try:
            return create_run(client, to_send, uri_database_key(tracking_uri)), True
        except Exception as exc:
            failed = exc
            raise

    try:
        run_id, created = call_with_retry(attempt, retry_timeout, on_retry)
    except SpoolError:
        raise
    except Exception as exc:  # named as a live round names it: the run, its experiment
        raise creation_failed(create, failed or exc, looked_up) from exc
    spool.mark_created(entry.key, run_id)
    return run_id, created


def deliver_run(
    spool: Spool,
    entry: RunEntry,
    client: Any,
    tracking_uri: str,
    retry_timeout: float,
    on_progress: ProgressHook | None = None,
    on_retry: RetryHook | None = None,
    exclude: frozenset[str] = frozenset(),
) -> RunDelivery:
    """Deliver one run of the journal; never raises for a failed call (see ``error``).

    Raises only :class:`~actors.spool._spool.SpoolError`: a journal that cannot be written stops
    the whole delivery, since nothing could be removed from it.
    """
    outcome = RunDelivery(entry.key, entry.run_id)
    gate = uri_database_key(tracking_uri)  # a SQLite file: this process's writers take turns
    step = "create_run"
    try:
        if outcome.run_id is None:
            outcome.run_id, outcome.created = resolve_creation(
                spool, entry, client, tracking_uri, retry_timeout, on_retry, exclude
            )
            creation = call_counts(entry.create) if entry.create else empty_counts()
            _add(outcome.delivered, creation)
            outcome.calls += 1
            if on_progress is not None:
                on_progress(entry.key, creation)
        while batch := spool.calls(entry.key, limit=_CHUNK):
            for seq, call in batch:
                step = call_kind(call)
                call_with_retry(
                    partial(_send, client, outcome.run_id, call, gate), retry_timeout, on_retry
                )
                spool.remove([seq])
                outcome.terminated = outcome.terminated or isinstance(call, SetTerminatedCall)
                counts = call_counts(call)
                _add(outcome.delivered, counts)
                outcome.calls += 1
                if on_progress is not None:
                    on_progress(entry.key, counts)
    except SpoolCorrupt as exc:  # an unreadable row: this run stops, the others go on
        outcome.error = str(exc)
    except SpoolError:  # the journal cannot be written: nothing can be removed, stop all
        raise
    except Exception as exc:
        outcome.transient = is_transient(exc)
        if isinstance(exc, CreationFailed):  # still in the journal if transient
            outcome.error = creation_error(exc, held=outcome.transient)
        else:
            outcome.error = f"{step} failed: {exc!r}"
    outcome.left = spool.counts(entry.key)
    outcome.calls_left = spool.pending_calls(entry.key)
    return outcome


def _send(client: Any, run_id: str, call: Call, gate: str | None) -> None:
    """One attempt at a journal's call, sent as a live round sends it: a metric-only batch
    on a database store through the SQL fast path (a re-sent point is stored once either
    way), anything else through MLflow's client."""
    if fast_path_call(call):
        fast = client_fast_path(client)
        if fast is not None and fast.database and log_batch_is_mlflows(client):
            assert isinstance(call, LogBatchCall)
            invoke_fast(fast, client, run_id, call, JobResult(run_id=run_id), gate)
            return
    invoke(client, run_id, call, gate)


def _add(target: dict[str, int], counts: dict[str, int]) -> None:
    for kind, n in counts.items():
        target[kind] += n


def deliver(
    spool: Spool,
    client: Any,
    retry_timeout: float,
    on_progress: ProgressHook | None = None,
    tracking_uri: str | None = None,
    on_retry: RetryHook | None = None,
) -> DeliverySummary:
    """Deliver every run of ``spool`` through ``client`` (an ``MlflowClient`` on
    ``tracking_uri``, the journal's own by default), run after run, each in its order."""
    uri = tracking_uri or spool.tracking_uri
    summary = DeliverySummary()
    entries = spool.runs()
    # Run IDs this journal already knows belong to other creations: a local look-up of a
    # creation of unknown outcome never takes one of them for its own.
    known = frozenset(entry.run_id for entry in entries if entry.run_id is not None)
    for entry in entries:
        outcome = deliver_run(
            spool, entry, client, uri, retry_timeout, on_progress, on_retry, known
        )
        if outcome.run_id is not None:
            known = known | {outcome.run_id}
        summary.runs.append(outcome)
    return summary
