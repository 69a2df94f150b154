"""``Supervisor``: the one actor per process that owns the registry of sessions and runs.

It assigns ``PendingRunId``s, starts a run's actor when the run first has something to
flush (and again after the actor stopped or crashed), fans flush requests out to the run
actors and returns their futures, and stops a run's actor once the run is terminated and
flushed. Being the only sender of flush requests is what makes that stop safe: it stops an
actor only when the actor has seen every request sent to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pykka

from actors._pending import PendingRunId
from actors._queues import CreateRun, RunQueues, closed_error
from actors._run_actor import FLUSH, RunActor, RunFinished
from actors._session import RunHandle, Session, SessionConfig
from actors._status import BUSY_STATES

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


class Supervisor(pykka.ThreadingActor):
    """Registry of sessions and runs; starts, feeds and stops the run actors."""

    use_daemon_thread = True

    def __init__(self) -> None:
        super().__init__()
        self._sessions: dict[int, Session] = {}
        self._next_id = 0

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, RegisterRun):
            return self._register(message)
        if isinstance(message, FlushSession):
            return self._flush(message.session)
        if isinstance(message, RunFinished):
            return self._finished(message)
        if isinstance(message, OpenSession):
            self._next_id += 1
            session = Session(self._next_id, message.config)
            self._sessions[session.id] = session
            return session
        if isinstance(message, CloseSession):
            return self._close(message.session)
        if isinstance(message, ListSessions):
            return list(self._sessions.values())
        raise TypeError(f"{self} got an unexpected message: {message!r}")

    def _register(self, message: RegisterRun) -> RunHandle:
        session = message.session
        if session.sealed or session.closed:  # closing: new runs are refused
            raise closed_error()
        if message.key is None:
            label = session.next_label()
            pending = PendingRunId._issue(session.id, label)
            return session.add_handle(RunHandle(pending, pending, RunQueues(message.create)))
        existing = session.handles.get(message.key)
        if existing is not None:
            return existing
        return session.add_handle(RunHandle(message.key, None, RunQueues()))

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

    def _finished(self, message: RunFinished) -> None:
        handle = message.handle
        if handle.ref is message.ref and handle.sent == message.seen:
            handle.ref = None
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
