"""What the keeper does once its parent died without closing: deliver, end the runs, leave.

In order, for every session (client with ``spool_dir``) the parent had open:

1. wait until the parent's worker processes (``executor="process"``) are gone, so that no
   call of the dead process reaches the store after the keeper's (one still running past
   ``retry_timeout`` is killed);
2. lock the session's journals (the dead process's ``flock`` is released by its death; a
   ``runactors replay`` that took one first delivers it instead);
3. record in the journal the runs the session created and did not terminate (``KILLED``,
   ended at the time of the death; :mod:`actors.spool._ends`), before anything else, so that
   a keeper killed from here on leaves the work to ``runactors replay``; a session without a
   journal gets a new one for this record;
4. deliver the journal (:func:`actors.spool._replay.deliver`: each call once, creations
   looked up before they are sent again), then end the recorded runs that have nothing left
   in it and that the store still says are running;
5. close the journals: deleted if empty, else left for ``runactors replay`` (which also ends
   the runs still recorded), with one warning saying so.

Every store call is retried for the session's ``retry_timeout``; once one fails past it, the
store is taken to be down and the rest is left in the journal.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from functools import partial
from typing import Any

from actors.delivery._retry import call_with_retry
from actors.delivery._store import make_client
from actors.queueing._queues import CreateRunCall
from actors.spool._codec import str_pairs
from actors.spool._ends import RunEnd, add_pending_ends, end_pending_runs
from actors.spool._format import SpoolError, SpoolGone, SpoolLocked
from actors.spool._replay import deliver
from actors.spool._spool import Spool

_logger = logging.getLogger("runactors.keeper")

WORKER_GRACE = 2.0  # seconds past retry_timeout a dead process's worker may still run
LOCK_WAIT = 5.0  # seconds a journal's lock may stay taken (by a replay) before it is left


_clients: dict[str, Any] = {}  # tracking URI -> its MlflowClient, made once


def prepare(sessions: dict[int, dict[str, Any]]) -> None:
    """Open the sessions' stores ahead of a death (a SQLite store checks its schema, which
    takes a second or two); a store that cannot be opened now is opened after the death."""
    for uri in {str(session["tracking_uri"]) for session in list(sessions.values())}:
        if uri not in _clients:
            try:
                _client(uri, 0.0)
            except Exception:
                pass


def _client(uri: str, retry_timeout: float) -> Any:
    """The store's client; made outside any lock (opening a locked SQLite store waits), so
    two threads may make one each: the first kept is used."""
    client = _clients.get(uri)
    if client is None:
        client = call_with_retry(partial(make_client, uri), retry_timeout)
        client = _clients.setdefault(uri, client)
    return client


def _wait_workers(workers: dict[int, int], timeout: float) -> None:
    """Wait until every worker's pidfd is readable (it exited); kill the rest after
    ``timeout`` and wait for them a moment more."""
    end = time.monotonic() + timeout
    pending = dict(workers)
    while pending:
        left = end - time.monotonic()
        if left <= 0:
            for pid, fd in pending.items():
                _logger.warning("keeper: worker %d of the dead process still runs: killed", pid)
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except OSError:
                    pass
            select.select(list(pending.values()), [], [], 2.0)
            break
        ready, _, _ = select.select(list(pending.values()), [], [], left)
        for fd in ready:
            pid = next(p for p, f in pending.items() if f == fd)
            del pending[pid]
    for fd in workers.values():
        os.close(fd)


def _open(path: str) -> Spool | None:
    end = time.monotonic() + LOCK_WAIT
    while True:
        try:
            return Spool.open(path)
        except SpoolGone:
            return None
        except SpoolLocked:
            if time.monotonic() >= end:
                _logger.warning("keeper: journal %s stays locked; left to its holder", path)
                return None
            time.sleep(0.05)
        except SpoolError as exc:
            _logger.warning("keeper: journal %s cannot be delivered: %s", path, exc.message)
            return None


def _ends(session: dict[str, Any], died_ms: int) -> list[RunEnd]:
    ends = []
    for key, run in session["runs"].items():
        raw = run.get("create")
        create = None
        if raw is not None:
            create = CreateRunCall(
                str(raw["experiment_id"]),
                raw.get("start_time"),
                str_pairs(raw.get("tags") or []),
                raw.get("run_name"),
                raw.get("create_key"),
            )
        ends.append(RunEnd(key, run.get("run_id"), create, died_ms))
    return ends


def recover_session(session: dict[str, Any], died_ms: int) -> None:
    """Deliver one session's journals and end its open runs (see the module's steps)."""
    uri, retry_timeout = str(session["tracking_uri"]), float(session["retry_timeout"])
    spools = [s for s in (_open(path) for path in session["journals"]) if s is not None]
    ends = _ends(session, died_ms) if session.get("end_runs", True) else []
    try:
        if ends and not spools:
            try:
                spools.append(Spool.create(session["spool_dir"], uri))
            except Exception as exc:  # no disk: ending them now is all that can be done
                _logger.warning("keeper: cannot record the runs to end: %r", exc)
        if spools and ends:
            add_pending_ends(spools[0], ends)
        if not spools:
            return
        try:
            client = _client(uri, retry_timeout)
        except Exception as exc:
            _logger.warning("keeper: tracking store %s unavailable: %r", uri, exc)
            return
        known: dict[str, str] = {}
        delivered = 0
        for spool in spools:
            summary = deliver(spool, client, retry_timeout, tracking_uri=uri)
            delivered += summary.calls
            known.update({run.key: run.run_id for run in summary.runs if run.run_id})
            for error in summary.errors:
                _logger.warning("keeper: %s", error)
        outcome = end_pending_runs(spools[0], client, uri, retry_timeout, known)
        for error in outcome.errors:
            _logger.warning("keeper: %s", error)
        _logger.warning(
            "keeper: the process died without closing its client: %d calls of its journal "
            "delivered, %d runs ended KILLED",
            delivered,
            len(outcome.ended),
        )
    finally:
        for spool in spools:
            path, left = spool.path, not spool.is_empty()
            spool.close()
            if left:
                _logger.warning(
                    "keeper: the journal %s is left for `runactors replay %s`, which "
                    "delivers it and ends the runs of the dead process",
                    path,
                    session["spool_dir"],
                )


def recover(
    parent: int, sessions: dict[int, dict[str, Any]], workers: dict[int, int], died_ms: int
) -> None:
    """Everything the keeper does after ``parent`` died with ``sessions`` open."""
    # One HTTP attempt per call: these retries (bounded by retry_timeout) do the retrying,
    # and look a creation up before sending it again.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    timeout = max((float(s["retry_timeout"]) for s in sessions.values()), default=0.0)
    _wait_workers(workers, timeout + WORKER_GRACE)
    for session in sessions.values():
        try:
            recover_session(session, died_ms)
        except Exception:
            _logger.exception("keeper: recovering a client of process %d failed", parent)
