"""``Supervisor``: the one actor per process that owns the registry of sessions and runs.

It assigns ``PendingRunId``s, schedules the run actors, and sends the background flushes.

**Scheduling.** A run's actor lives only while the run has a round to make (or, parked idle,
until its place is needed): a client has at most ``Session.slots`` live actors, so 10,000
runs flushing are a few dozen threads, not 10,000. ``flush()`` is answered at once with one
:class:`~actors.status._handle.RunWait` per run; each run's request waits at the supervisor
(``RunHandle.waits``) until its actor can start a round: at once if the actor is live and
idle, when its round ends if it is busy, and when a place frees if it has no actor (the run
is then ``ready``, in the session's first-come-first-served ready queue, at most once). The
supervisor sends an actor one round at a time (``Flush``) and hears when it has ended
(``RoundEnded``); being the only sender, it knows exactly when an actor is idle, which is
what makes stopping it safe. A run with a request still pending when its round ends goes to
the back of the ready queue if other runs wait for a place (so busy runs cannot starve them).

It also sends the background flushes: every ``flush_interval`` seconds (told by the
process's one :class:`~actors.runtime._ticker.Ticker`), when a run's queue holds a full batch, and
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

from actors.delivery._jobs import failure_message
from actors.queueing._bounded_queues import WatchedRunQueues
from actors.queueing._pending import PendingRunId
from actors.queueing._queues import CreateRunCall, closed_error
from actors.runtime._failures import round_failure
from actors.runtime._run_actor import Flush, RoundEnded, RunActor
from actors.runtime._session import Session, SessionConfig
from actors.runtime._ticker import Ticker
from actors.status._handle import FlushCall, RunHandle, RunWait

# One run's part of one flush() (settled when that run's flush has ended).
Ticket = RunWait


@dataclass(frozen=True)
class OpenSession:
    config: SessionConfig


@dataclass(frozen=True)
class RegisterRun:
    session: Session
    key: str | None  # None: a new pending run, created by ``create``
    create: CreateRunCall | None = None


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


@dataclass(frozen=True)
class StartActors:
    """Told to itself after answering a flush: start actors for the ready runs of a session."""

    session: Session


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
        if isinstance(message, RoundEnded):
            return self._round_ended(message)
        if isinstance(message, StartActors):
            return self._start_actors(message.session)
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
            pending = PendingRunId._issue(label)
            handle = RunHandle(pending, pending, session.new_queues(message.create))
            if session.keeper is not None and message.create is not None:
                session.keeper.created(session.id, label, message.create)
        else:
            existing = session.handles.get(message.key)
            if existing is not None:
                return existing
            handle = RunHandle(message.key, None, session.new_queues())
            session.share_params(handle, message.key)  # with its PendingRunId's, if any
        if isinstance(handle.queues, WatchedRunQueues):
            handle.queues.on_full = _teller(self.actor_ref, FlushInBackground(session, handle))
        return session.add_handle(handle)

    def _flush(self, session: Session) -> list[Ticket]:
        if session.closed:
            raise closed_error()
        call = FlushCall()
        tickets: list[Ticket] = []
        spooler = session.spooler
        for handle in list(session.handles.values()):
            # A run with a round in flight or requested gets a round after it, to wait for;
            # a spooled run's flush re-sends its spooled calls, even with nothing queued.
            if not (
                handle.busy
                or handle.requested
                or handle.queues.has_work()
                or (spooler is not None and spooler.holds(handle))
            ):
                continue  # nothing to send and nothing in flight to wait for
            wait = RunWait(handle, call)
            handle.waits.append(wait)
            self._request(session, handle)
            tickets.append(wait)
        if session.ready:  # after this answer: starting threads takes time
            self.actor_ref.tell(StartActors(session))
        return tickets

    def _request(self, session: Session, handle: RunHandle) -> None:
        """Ask for a round of this run: sent now if its actor is idle, when its round ends
        if it is busy, and when a place frees if it has no actor (the run is ``ready``)."""
        handle.requested = True
        if handle.ref is not None:
            if not handle.busy:
                self._send(session, handle)
        elif not handle.ready:
            handle.ready = True
            handle.record.state = "ready"
            session.ready.append(handle)

    def _send(self, session: Session, handle: RunHandle) -> None:
        """Give the run's live, idle actor its next round, with the waits requested so far."""
        assert handle.ref is not None
        waits, handle.waits, handle.requested = handle.waits, [], False
        handle.busy = True
        session.idle.pop(handle, None)
        try:
            handle.ref.tell(Flush(handle, waits))
        except pykka.ActorDeadError:  # it crashed just now: a new actor takes the round
            handle.waits = waits + handle.waits
            self._forget_actor(session, handle)
            self._request(session, handle)

    def _forget_actor(self, session: Session, handle: RunHandle) -> None:
        handle.ref, handle.busy = None, False
        session.idle.pop(handle, None)
        session.live -= 1

    def _release(self, session: Session, handle: RunHandle) -> None:
        """The run no longer needs its idle actor: the first ready run gets it (a thread
        saved), or it stops."""
        ref = handle.ref
        assert ref is not None and not handle.busy
        self._forget_actor(session, handle)
        if session.ready and not session.closed:
            successor = session.ready.popleft()
            successor.ready = False
            successor.ref = ref
            session.live += 1
            self._send(session, successor)
        else:
            ref.stop(block=False)

    def _start_actors(self, session: Session) -> None:
        """Give the ready runs actors, first come first served, as long as places are free
        (an idle actor is handed over, least recently used first)."""
        while session.ready and not session.closed:
            if session.live >= session.slots:
                if not session.idle:
                    return
                self._release(session, next(iter(session.idle)))
                continue
            handle = session.ready.popleft()
            handle.ready = False
            handle.ref = RunActor.start(self.actor_ref, session, handle)
            session.live += 1
            self._send(session, handle)

    def _round_ended(self, message: RoundEnded) -> None:
        handle = message.handle
        if handle.ref is not message.ref:  # an actor already forgotten (it crashed)
            return
        session = message.session
        handle.busy = False
        if message.crashed:  # its waits are failed; the next round gets a new actor
            self._forget_actor(session, handle)
            if handle.requested:
                self._request(session, handle)
        elif handle.requested:
            if session.ready and not session.idle and session.live >= session.slots:
                # Others wait for a place: its actor goes to the first, this run behind them.
                self._release(session, handle)
                self._request(session, handle)
            else:
                self._send(session, handle)
        elif handle.record.terminated and not handle.queues.has_work():
            # Said here, on the supervisor's thread, not only by the actor's on_stop: a close
            # handled next must see "stopped", or it would call a finished run "closed".
            handle.record.state = "stopped"
            self._release(session, handle)
        else:
            with handle.record.lock:  # the spooler may write the state meanwhile
                if handle.record.state == "stopped":  # its actor said so; new entities came
                    handle.record.state = "idle"
            if session.ready:
                self._release(session, handle)
            else:
                session.idle[handle] = None  # parked: stopped when its place is needed
        self._start_actors(session)

    def _flush_in_background(self, message: FlushInBackground) -> None:
        session = message.session
        if session.closed:
            return
        handles = session.handles.values() if message.handle is None else [message.handle]
        self._send_background(session, handles)

    def _send_background(self, session: Session, handles: Iterable[RunHandle]) -> None:
        spooler = session.spooler
        for handle in list(handles):
            # A run with only a round in flight needs nothing; a spooled run is re-sent even
            # with nothing queued, so that a service recovers by itself once the store is back.
            if handle.queues.has_work() or (
                spooler is not None and not handle.busy and spooler.holds(handle)
            ):
                self._request(session, handle)
        self._start_actors(session)

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

    def _close(self, session: Session) -> list[pykka.Future[Any]]:
        session.seal()  # already sealed by the client; not when closed at exit
        session.closed = True
        self._sessions.pop(session.id, None)
        stops: list[pykka.Future[Any]] = []
        session.ready.clear()
        session.idle.clear()
        session.live = 0
        for handle in session.handles.values():
            waits, handle.waits = handle.waits, []
            handle.requested = handle.ready = handle.busy = False
            if waits:  # requested, never sent: no actor will settle them
                message = failure_message(
                    handle.record.label, ["the client was closed before this flush completed"]
                )
                # Lost, unless the spooler puts what the run still has queued on disk.
                lost = message if session.spooler is None else None
                failure = round_failure(session.failures, message, lost)
                for wait in waits:
                    wait.settle(failure)
            if handle.ref is not None:
                stops.append(handle.ref.stop(block=False))
                handle.ref = None
            elif handle.record.state not in ("stopped", "failed", "crashed"):
                handle.record.state = "closed"
        return stops
