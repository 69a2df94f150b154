"""``Supervisor``: the one actor per process that owns the registry of sessions and runs.

It assigns ``PendingRunId``s, starts a run's actor when the run first has something to
flush (and again after the actor stopped or crashed), fans flush requests out to the run
actors and returns their futures, and stops a run's actor once the run is terminated and
flushed. Being the only sender of flush requests is what makes that stop safe: it stops an
actor only when the actor has seen every request sent to it.

It also sends the background flushes: every ``flush_interval`` seconds (told by the
process's one :class:`~actors._ticker.Ticker`), when a run's queue holds a full batch, and
when a client with ``max_queued`` is full. They take the same path as ``flush()``, through
the run's actor, so ordering and isolation hold; nobody waits on them, and the run actor
reports their failures (see ``RunActor``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pykka

from actors._pending import PendingRunId
from actors._queues import CreateRun, WatchedRunQueues, closed_error
from actors._run_actor import BACKGROUND_FLUSH, FLUSH, RunActor, RunFinished
from actors._session import RunHandle, Session, SessionConfig
from actors._status import BUSY_STATES
from actors._ticker import Ticker

# One flush request per run: the run's handle and the reply (a future of the outcome).
Ticket = tuple[RunHandle, "pykka.Future[Any]"]


@dataclass(frozen=True)
class OpenSession:
    config: SessionConfig


@dataclass(frozen=True)
class RegisterRun:
    session: Session
    key: str | None  # None: a new pending run, created by ``create``
    create: CreateRun | None = None


@dataclass(frozen=True)
class FlushSession:
    session: Session


@dataclass(frozen=True)
class CloseSession:
    session: Session


class ListSessions:
    pass


class Tick:
    """Told by the ticker: some session's ``flush_interval`` is due."""


TICK = Tick()


@dataclass(frozen=True)
class FlushInBackground:
    """Flush these runs of a session (all of them if ``handle`` is None), nobody waiting."""

    session: Session
    handle: RunHandle | None = None


def _teller(ref: pykka.ActorRef[Any], message: Any) -> Any:
    """A callable that tells ``ref`` ``message`` from any thread, and does nothing once
    ``ref`` has stopped (at exit, say)."""

    def tell() -> None:
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            pass

    return tell


class Supervisor(pykka.ThreadingActor):
    """Registry of sessions and runs; starts, feeds and stops the run actors."""

    use_daemon_thread = True

    def __init__(self, ticker: Ticker | None = None) -> None:
        super().__init__()
        self._sessions: dict[int, Session] = {}
        self._next_id = 0
        self._ticker = ticker

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, RegisterRun):
            return self._register(message)
        if isinstance(message, FlushSession):
            return self._flush(message.session)
        if isinstance(message, RunFinished):
            return self._finished(message)
        if isinstance(message, FlushInBackground):
            return self._flush_in_background(message)
        if message is TICK:
            return self._tick()
        if isinstance(message, OpenSession):
            return self._open(message.config)
        if isinstance(message, CloseSession):
            return self._close(message.session)
        if isinstance(message, ListSessions):
            return list(self._sessions.values())
        raise TypeError(f"{self} got an unexpected message: {message!r}")

    def _open(self, config: SessionConfig) -> Session:
        self._next_id += 1
        session = Session(self._next_id, config)
        self._sessions[session.id] = session
        if config.max_queued is not None and session.budget is not None:
            session.budget.request_flush = _teller(self.actor_ref, FlushInBackground(session))
        if config.flush_interval is not None and self._ticker is not None:
            session.next_flush = time.monotonic() + config.flush_interval
            self._ticker.schedule(session.next_flush)
        return session

    def _register(self, message: RegisterRun) -> RunHandle:
        session = message.session
        if session.sealed or session.closed:  # closing: new runs are refused
            raise closed_error()
        if message.key is None:
            label = session.next_label()
            pending = PendingRunId._issue(session.id, label)
            handle = RunHandle(pending, pending, session.new_queues(message.create))
        else:
            existing = session.handles.get(message.key)
            if existing is not None:
                return existing
            handle = RunHandle(message.key, None, session.new_queues())
        if isinstance(handle.queues, WatchedRunQueues):
            handle.queues.on_full = _teller(self.actor_ref, FlushInBackground(session, handle))
        return session.add_handle(handle)

    def _actor_for(self, session: Session, handle: RunHandle) -> pykka.ActorRef[Any]:
        if handle.ref is None or not handle.ref.is_alive():
            handle.ref = RunActor.start(self.actor_ref, session, handle)
            handle.sent = 0
        return handle.ref

    def _flush(self, session: Session) -> list[Ticket]:
        if session.closed:
            raise closed_error()
        tickets: list[Ticket] = []
        for handle in list(session.handles.values()):
            # A spooled run's flush re-sends its spooled calls, even with nothing queued.
            spooled = session.spooler is not None and session.spooler.holds(handle)
            if not (handle.queues.has_work() or spooled or handle.record.state in BUSY_STATES):
                continue  # nothing to send and nothing in flight to wait for
            ref = self._actor_for(session, handle)
            handle.sent += 1
            tickets.append((handle, ref.ask(FLUSH, block=False)))
        return tickets

    def _flush_in_background(self, message: FlushInBackground) -> None:
        session = message.session
        if session.closed:
            return
        handles = session.handles.values() if message.handle is None else [message.handle]
        self._send_background(session, handles)

    def _send_background(self, session: Session, handles: Iterable[RunHandle]) -> None:
        for handle in list(handles):
            if handle.queues.has_work():  # a run with only a round in flight needs nothing
                ref = self._actor_for(session, handle)
                handle.sent += 1
                ref.tell(BACKGROUND_FLUSH)

    def _tick(self) -> None:
        """Flush every session whose ``flush_interval`` is due; schedule the nearest next."""
        now = time.monotonic()
        nearest: float | None = None
        for session in list(self._sessions.values()):
            interval, due = session.config.flush_interval, session.next_flush
            if interval is None or due is None or session.sealed:
                continue
            if due <= now:
                self._send_background(session, session.handles.values())
                due = session.next_flush = now + interval
            nearest = due if nearest is None else min(nearest, due)
        if nearest is not None and self._ticker is not None:
            self._ticker.schedule(nearest)

    def _finished(self, message: RunFinished) -> None:
        handle = message.handle
        if handle.ref is message.ref and handle.sent == message.seen:
            handle.ref = None
            # Said here, on the supervisor's thread, not only by the actor's on_stop: a close
            # handled next must see "stopped", or it would call a finished run "closed".
            handle.record.state = "stopped"
            message.ref.stop(block=False)

    def _close(self, session: Session) -> list[pykka.Future[Any]]:
        session.seal()  # already sealed by the client; not when closed at exit
        session.closed = True
        self._sessions.pop(session.id, None)
        stops: list[pykka.Future[Any]] = []
        for handle in session.handles.values():
            if handle.ref is not None:
                stops.append(handle.ref.stop(block=False))
                handle.ref = None
            elif handle.record.state not in ("stopped", "crashed"):
                handle.record.state = "closed"
        return stops
