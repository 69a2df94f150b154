"""A client's share of the actor system: its configuration, its runs and its executor."""

from __future__ import annotations

import sys
import threading
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

from actors.executors._executor import Executor, ThreadExecutor, default_max_workers
from actors.keeper._link import LINK, KeeperLink
from actors.keeper._link import enabled as keeper_enabled
from actors.queueing._bounded_queues import BoundedRunQueues, WatchedRunQueues
from actors.queueing._budget import Budget
from actors.queueing._param_memory import ParamMemory
from actors.queueing._queues import CreateRunCall, RunQueues, closed_error
from actors.runtime._failures import FailureLog
from actors.spool._spill import Spill
from actors.spool._spooling import Spooler
from actors.status._handle import RunHandle

# How many of a client's runs may have a live actor (a thread) at once: more than its
# executor can serve buy nothing, a few more keep the executor fed while actors change.
ACTORS_PER_WORKER = 2
MIN_ACTORS = 16


def actor_slots(config: SessionConfig) -> int:
    """The number of live run actors a client's session allows."""
    return max(ACTORS_PER_WORKER * (config.max_workers or default_max_workers()), MIN_ACTORS)


@dataclass(frozen=True)
class SessionConfig:
    """Everything a client is configured with; all a pickled client carries."""

    tracking_uri: str
    executor: str = "thread"
    max_workers: int | None = None
    flush_interval: float | None = None
    max_queued: int | None = None
    retry_timeout: float = 60.0
    spool_dir: str | None = None
    end_runs: bool = True  # the client's: when the process dies, end the runs it created
    journal_interval: float = 0.2  # with spool_dir: most seconds an append waits for the disk


class Session:
    """The runtime side of one client; created and registered by the supervisor.

    Closing it takes two steps: :meth:`seal` (no new runs, no new operations; what is queued
    stays, for the last flush), then the supervisor's close (``closed``: actors stopped).
    """

    def __init__(self, session_id: int, config: SessionConfig) -> None:
        self.id = session_id
        self.config = config
        self.handles: dict[Any, RunHandle] = {}  # added to by the supervisor only
        self.sealed = False
        self.closed = False
        self._seq = 0
        self._executor: Executor | None = None
        self._lock = threading.Lock()
        self._handles_lock = threading.Lock()  # makes adding a run and sealing atomic
        # What the client holds in memory, shared by all its runs' queues: bounded by
        # max_queued; counted without a bound for flush_interval; not at all without either.
        self.budget: Budget | None = None
        if config.max_queued is not None or config.flush_interval is not None:
            limit = sys.maxsize if config.max_queued is None else config.max_queued
            self.budget = Budget(limit, config.retry_timeout)
        self.failures = FailureLog()  # failed rounds no flush() has raised yet
        # Each run's one param memory, by run ID: its PendingRunId's queues and its ID
        # string's share it (share_params), so a param cannot change through the other name.
        self._params: dict[str, ParamMemory] = {}
        self._params_lock = threading.Lock()
        self.next_flush: float | None = None  # flush_interval: the next background flush
        # The supervisor's scheduling of run actors (its thread only): at most ``slots`` live
        # actors (``live``); runs waiting for one, first come first served, each at most
        # once (``ready``); live actors with no round, least recently used first (``idle``).
        self.slots = actor_slots(config)
        self.live = 0
        self.ready: deque[RunHandle] = deque()
        self.idle: dict[RunHandle, None] = {}
        # With spool_dir: the journal of what could not be delivered (opened at first use).
        self.spooler = (
            None
            if config.spool_dir is None
            else Spooler(
                config.spool_dir,
                config.tracking_uri,
                config.retry_timeout,
                f"runactors-{self.id}",
                workers=config.max_workers or default_max_workers(),  # re-sent in parallel
                journal_interval=config.journal_interval,
            )
        )
        if self.budget is not None and self.spooler and self.spooler.journal is not None:
            # max_queued with a journal: what is on disk leaves memory (actors.spool._spill).
            self.budget.spill = Spill(self.spooler, self.handles.values)
            self.spooler.journal.on_commit = self.budget.wake
        # With spool_dir: the process's keeper, told of this session (started if need be).
        self.keeper: KeeperLink | None = None
        if self.spooler is not None and keeper_enabled():
            self.keeper = LINK
            LINK.open_session(self.id, config)
            self.spooler.on_journal = partial(LINK.journal, self.id)
        if config.executor == "process":
            # Made now, at the client's first use, not at its first flush: the executor starts
            # the worker template, whose imports (~2 s of CPU) then overlap the user's work.
            self.executor()

    def keeper_state(self) -> str | None:
        """What ``status()`` says of the keeper: None without ``spool_dir``, ``stopped``
        once closed, else ``running``, ``restarted`` or ``dead``."""
        if self.keeper is None:
            return None
        return "stopped" if self.closed else self.keeper.state()

    def journal_failure(self) -> str | None:
        """Why the last write of the write-ahead journal failed, until one succeeds; None
        without a journal or while it is written."""
        journal = None if self.spooler is None else self.spooler.journal
        return None if journal is None else journal.failure

    def new_queues(self, create: CreateRunCall | None = None) -> RunQueues:
        """The queues of a new run: plain, unless ``max_queued`` or ``flush_interval`` is set."""
        if self.budget is None:
            return RunQueues(create)
        if self.config.flush_interval is not None:
            return WatchedRunQueues(create, self.budget)
        return BoundedRunQueues(create, self.budget)

    def add_handle(self, handle: RunHandle) -> RunHandle:
        """Register a new run, unless the session is sealed (then ``closed_error()``)."""
        with self._handles_lock:
            if self.sealed:
                raise closed_error()
            registered = self.handles.setdefault(handle.key, handle)
        if registered is handle and self.spooler is not None:
            self.spooler.attach(handle)  # its appends are journaled from now on
        return registered

    def share_params(self, handle: RunHandle, run_id: str) -> None:
        """``handle`` (a run's ID string, or a pending run that has learned its ID) checks
        params against the run's one memory from now on, whichever of its names came first."""
        with self._params_lock:
            memory = self._params.setdefault(run_id, handle.queues.params_memory)
        if memory is not handle.queues.params_memory:
            handle.queues.use_params(memory)

    def seal(self) -> None:
        """Refuse new runs and new operations from now on; idempotent.

        Every run's queues are sealed under the same lock that adds runs, so no run can be
        added unsealed after this returns, and the next flush sends everything accepted.
        """
        with self._handles_lock:
            self.sealed = True
            handles = list(self.handles.values())
        for handle in handles:
            handle.queues.seal()

    def next_label(self) -> str:
        self._seq += 1
        return f"pending-{self.id}-{self._seq}"

    def executor(self) -> Executor:
        """The session's executor, started on first use."""
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = self._make_executor()
        return self._executor

    def started_executor(self) -> Executor | None:
        """The session's executor if it was started (never starts one)."""
        return self._executor

    def _make_executor(self) -> Executor:
        name = f"runactors-{self.id}"
        if self.config.executor == "process":
            from actors.executors._process_executor import ProcessExecutor

            return ProcessExecutor(self.config.max_workers, name=name)
        return ThreadExecutor(self.config.max_workers, name=name)

    def shutdown_executor(self, timeout: float | None) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(timeout)
