"""The process-wide actor system: started lazily, rebuilt after ``fork``, closed at exit.

One :class:`ActorSystem` (one :class:`~actors.runtime._supervisor.Supervisor`) serves every client
in a process, the way MLflow's autologging creates a client per ``fit()``. All its threads
are daemon threads, so the interpreter never waits on them; instead an ``atexit`` handler
flushes and closes every open session within ``RUNACTORS_EXIT_TIMEOUT`` seconds (default
30), letting flushes already in flight complete. The system also owns the process's one
:class:`~actors.runtime._ticker.Ticker` (the timer of every client's ``flush_interval``), whose
thread starts with the first client that has one, and stops with the system.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Any

import pykka

from actors.queueing._pending import format_seconds
from actors.queueing._queues import CreateRunCall
from actors.runtime._failures import RoundFailure
from actors.runtime._run_actor import RunActor
from actors.runtime._session import Session, SessionConfig
from actors.runtime._supervisor import (
    TICK,
    CloseSession,
    FlushSession,
    ListSessions,
    OpenSession,
    RegisterRun,
    Supervisor,
    Ticket,
)
from actors.runtime._ticker import Ticker
from actors.spool._spooling import close_reserve
from actors.status._handle import RunHandle

_logger = logging.getLogger("runactors.runtime")

EXIT_TIMEOUT_ENV = "RUNACTORS_EXIT_TIMEOUT"
DEFAULT_EXIT_TIMEOUT = 30.0


def exit_timeout() -> float:
    try:
        return float(os.environ.get(EXIT_TIMEOUT_ENV, DEFAULT_EXIT_TIMEOUT))
    except ValueError:
        return DEFAULT_EXIT_TIMEOUT


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self._end is None else max(self._end - time.monotonic(), 0.0)


def ticket_done(ticket: Ticket) -> bool:
    """Whether this run's part of a flush has finished."""
    return ticket.done()


def wait_tickets(
    tickets: list[Ticket], timeout: float | None = None, lost_only: bool = False
) -> list[str]:
    """Wait for every run's part of a flush; return one failure message per failed run
    (``lost_only``: only what each run lost, leaving out calls that are safe in the spool).

    Raises ``TimeoutError`` if ``timeout`` seconds pass first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    failures: list[str] = []
    for ticket in tickets:
        try:
            error = ticket.wait(deadline)
        except TimeoutError:
            waited = format_seconds(0.0 if timeout is None else timeout)
            raise TimeoutError(f"the flush did not complete within {waited} s") from None
        if error is None:
            continue
        if not isinstance(error, RoundFailure):
            failures.append(error.message)
            continue
        message = error.lost if lost_only else error.message
        if message is not None:
            failures.append(message)
        error.mark_raised()  # the caller raises it: close() need not raise it again
    return failures


def _late_flush_message(waited: float, timeout: float | None) -> str:
    """What a close without a spool whose last flush ran out of time says: how long it
    really waited, and the caller's bound."""
    bound = format_seconds(0.0 if timeout is None else timeout)
    return (
        f"closing before the last flush completed: it had not completed after "
        f"{format_seconds(waited)} s (close waits at most {bound} s)"
    )


class ActorSystem:
    """The supervisor of this process and the calls clients make on it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.ticker = Ticker(self._tick)
        self.supervisor = Supervisor.start(self.ticker)

    def _tick(self) -> None:
        self.supervisor.tell(TICK)

    def _ask(self, message: Any, deadline: _Deadline | None = None) -> Any:
        # The supervisor answers at once; a deadline only guards the exit path against a
        # supervisor that cannot answer at all.
        remaining = None if deadline is None else deadline.remaining()
        timeout = None if remaining is None else max(remaining, 0.1)
        return self.supervisor.ask(message, timeout=timeout)

    def open_session(self, config: SessionConfig) -> Session:
        session: Session = self._ask(OpenSession(config))
        return session

    def register_run(
        self, session: Session, key: str | None, create: CreateRunCall | None = None
    ) -> RunHandle:
        handle: RunHandle = self._ask(RegisterRun(session, key, create))
        return handle

    def flush(self, session: Session, deadline: _Deadline | None = None) -> list[Ticket]:
        tickets: list[Ticket] = self._ask(FlushSession(session), deadline)
        return tickets

    def sessions(self, deadline: _Deadline | None = None) -> list[Session]:
        sessions: list[Session] = self._ask(ListSessions(), deadline)
        return sessions

    def close_session(self, session: Session, timeout: float | None = None) -> list[str]:
        """Flush what the session queued, wait up to ``timeout`` s, stop its actors and
        executor; return what is lost: the failure messages of that last flush, after those
        of earlier rounds that no ``flush()`` raised (background flushes, say). What is safe
        in the spool is not lost: the spooler says where it is, in one warning."""
        if session.closed:
            return []
        session.seal()  # from here a racing call raises, or is in the flush below
        deadline = _Deadline(timeout)
        spooler = session.spooler
        # With a spool, the flush leaves part of the bound for spooling what it cannot send.
        reserve = 0.0 if spooler is None else close_reserve(timeout)
        flush_deadline = _Deadline(None if timeout is None else max(timeout - reserve, 0.0))
        failures: list[str] = []
        late = False
        began = time.monotonic()
        try:
            tickets = self.flush(session, flush_deadline)
            failures = wait_tickets(tickets, flush_deadline.remaining(), lost_only=True)
        except (TimeoutError, pykka.Timeout):
            late = True
            if spooler is None:  # with a spool, what the rounds had not sent is spooled below
                failures = [_late_flush_message(time.monotonic() - began, timeout)]
        finally:
            try:
                stops = self._ask(CloseSession(session), deadline)
                pykka.get_all(stops, timeout=deadline.remaining())
            except pykka.Timeout:
                waited = format_seconds(0.0 if timeout is None else timeout)
                _logger.warning("some run actors did not stop within %s s", waited)
            grace = deadline.remaining()
            if spooler is not None and late:
                # Past the flush's bound: jobs still running stop at their next retry or
                # call (the executor is abandoned at once), and are spooled.
                grace = 0.0
            session.shutdown_executor(grace)
            if spooler is not None:
                try:
                    failures += spooler.close(list(session.handles.values()), deadline.remaining())
                finally:
                    if session.keeper is not None:  # closed cleanly: the keeper forgets it
                        session.keeper.close_session(session.id)
        return session.failures.take_unraised() + failures

    def stop(self, timeout: float | None = None) -> None:
        """Close every session and stop the supervisor (used at interpreter exit)."""
        deadline = _Deadline(timeout)
        self.ticker.stop(deadline.remaining())  # no background flush races the last ones
        try:
            sessions = self.sessions(deadline)
        except Exception:  # no answer: the daemon threads end with the process anyway
            _logger.warning("the actor system did not answer at exit")
            return
        for session in sessions:
            self.close_unattended(session, deadline.remaining(), "at exit")
        self.supervisor.stop(block=False)

    def close_unattended(self, session: Session, timeout: float | None, when: str) -> None:
        """Close a session that no caller waits on (at exit, or a client the garbage
        collector dropped): what :meth:`close_session` would have raised is logged as
        warnings, each line saying ``when``, since there is nobody to raise it to."""
        try:
            failures = self.close_session(session, timeout)
        except Exception:
            _logger.exception("closing a client %s failed", when)
            return
        for failure in failures:
            _logger.warning("%s: %s", when, failure)


_system: ActorSystem | None = None
_system_lock = threading.Lock()
_exit_registered = False
_stopped = False  # stop_at_exit() ran: the exit handler has nothing left to do
_stop_lock = threading.Lock()


def get_system() -> ActorSystem:
    """This process's actor system, started on first use."""
    global _system, _exit_registered
    system = _system
    if system is not None:
        return system
    with _system_lock:
        if _system is None:
            _system = ActorSystem()
            if not _exit_registered:
                atexit.register(_stop_at_exit)
                _exit_registered = True
        return _system


def _stop_at_exit() -> None:
    stop_at_exit()


def stop_at_exit() -> None:
    """Close every open client of this process now, as the exit handler does (within
    ``RUNACTORS_EXIT_TIMEOUT``): called early by a process that dies of a signal. Once."""
    global _stopped
    with _stop_lock:  # a second caller waits for the first one's delivery
        system = _system
        if system is None or system.pid != os.getpid() or _stopped:
            return
        _stopped = True
        system.stop(exit_timeout())


def _after_fork_in_child() -> None:
    """Forget the parent's actors (their threads do not exist here) and its DB connections.

    The process executor registers its own fork handlers: the child closes its copies of the
    parent's worker sockets, which would otherwise keep those workers (and the parent's
    ``close()``) waiting for as long as the child lives.
    """
    global _system, _system_lock, _stopped, _stop_lock
    _system_lock = threading.Lock()
    _stopped, _stop_lock = False, threading.Lock()
    if _system is None:
        return
    _system = None
    # A parent thread may have held the registry lock at fork time.
    pykka.ActorRegistry._actor_refs_lock = threading.RLock()
    for ref in pykka.ActorRegistry.get_all():
        if ref.actor_class in (Supervisor, RunActor):
            pykka.ActorRegistry.unregister(ref)
    _forget_inherited_engines()


def _forget_inherited_engines() -> None:
    # SQLAlchemy's recipe for fork: the child drops the pooled connections it inherited,
    # without closing them (they still belong to the parent), and opens its own.
    module = sys.modules.get("mlflow.store.tracking.sqlalchemy_store")
    store = getattr(module, "SqlAlchemyStore", None)
    if store is None:
        return
    engines = getattr(store, "_engine_map", None)  # MLflow's engine per URI (private)
    if not isinstance(engines, dict):
        _logger.warning(
            "MLflow has no SqlAlchemyStore._engine_map; a forked child"
            " may share its parent's database connections"
        )
        return
    store._engine_map_lock = threading.Lock()
    for engine in list(engines.values()):
        try:
            engine.dispose(close=False)
        except Exception:  # pragma: no cover - best effort
            _logger.debug("could not reset an inherited engine", exc_info=True)


os.register_at_fork(after_in_child=_after_fork_in_child)
