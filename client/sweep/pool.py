"""The sweep's worker processes, spawned, and fed one trial at a time by the parent.

The parent creates each trial's run as it hands the trial to a worker over its pipe, so it
knows every run that exists and which worker holds which trial; a worker that dies fails
only its own trial. Over the same pipe the workers report progress, status snapshots and
results (see :mod:`client.sweep.messages`).
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import multiprocessing.connection
import time
from multiprocessing.context import SpawnContext
from multiprocessing.synchronize import Event as EventType
from typing import TYPE_CHECKING, Any

import cloudpickle
from mlflow.exceptions import MlflowException

from client._client import QueueingClient
from client.sweep.messages import Message, Progress, Snapshot, TrialResult, TrialSpec, WorkerReady
from client.sweep.options import EXIT_SECONDS, STOP_GRACE_SECONDS, one_line
from client.sweep.signals import CtrlC, sigint_held
from client.sweep.training import serve_trials
from client.sweep.trials import Trials

if TYPE_CHECKING:
    from client import PendingRunId
    from client.sweep.view import View


class Worker:
    """A spawned worker process, the parent's end of its pipe, and the trial it was given."""

    def __init__(self, context: SpawnContext, stop: EventType, payload: bytes) -> None:
        conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=serve_trials, args=(child_conn, stop, payload), name="runactors-sweep-worker"
        )
        self.process.start()
        child_conn.close()  # the worker's end lives in the worker: its death reads as EOF here
        self.conn = conn
        self.ready = False
        self.creating: tuple[TrialSpec, PendingRunId] | None = None  # its next trial's run
        self.trial: TrialSpec | None = None  # the trial it holds

    def give(self, spec: TrialSpec | None) -> bool:
        """Send a trial (None: exit); False if the worker is gone (its death is seen next)."""
        self.trial = spec
        try:
            self.conn.send(spec)
        except OSError:
            return False
        return True

    def receive(self) -> tuple[list[Message], bool]:
        """The messages that arrived, without waiting for more, and whether the pipe closed."""
        messages: list[Message] = []
        try:
            while self.conn.poll():
                messages.append(self.conn.recv())
        except (EOFError, OSError):
            return messages, True
        except Exception:  # a message cut short by the worker's death
            return messages, True
        return messages, False

    def stop(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the process to exit, then terminate and kill it."""
        self.process.join(grace)
        if self.process.exitcode is None:
            self.process.terminate()
            self.process.join(EXIT_SECONDS)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
        self.conn.close()


class Pool:
    """The sweep's worker processes, fed one trial at a time by the parent.

    The parent, not a pool thread, hands out the trials, so it knows at every moment which
    trial each worker holds: after a Ctrl-C no trial is handed out, and the parent knows which
    ones to wait for. It waits on the workers' pipes and their process sentinels together, so
    a worker that dies (killed, crashed, out of memory) is seen at once and fails only its own
    trial; nothing waits on a result that cannot come.
    """

    def __init__(self, trials: Trials, stop: EventType, ctrl_c: CtrlC) -> None:
        self._trials = trials
        self._stop = stop
        self._ctrl_c = ctrl_c
        self._waiting = collections.deque(trials.specs)
        self._workers: list[Worker] = []
        self._deadline: float | None = None  # set by a Ctrl-C: when running trials get killed

    def start(self, count: int, payload: bytes) -> None:
        context = multiprocessing.get_context("spawn")
        with sigint_held():
            for _ in range(count):
                if self._ctrl_c.pressed:
                    return
                self._workers.append(Worker(context, self._stop, payload))

    def run(self) -> None:
        """Hand out the trials and collect their outcome until every trial has ended, or until
        the running ones had their time to stop after a Ctrl-C."""
        while not self._trials.done:
            if self._ctrl_c.pressed and self._deadline is None:
                self._interrupt()
            if self._deadline is not None and time.monotonic() > self._deadline:
                return
            self._hand_out()
            objects: list[Any] = [w.conn for w in self._workers]
            objects += [w.process.sentinel for w in self._workers]
            ready = set(multiprocessing.connection.wait(objects, timeout=0.2))
            for worker in list(self._workers):
                if worker.conn in ready or worker.process.sentinel in ready:
                    self._serve(worker, worker.process.sentinel in ready)
            self._trials.view.tick(self._trials.board)

    def _hand_out(self) -> None:
        """Give each idle worker a trial: first create its run here, then send the trial."""
        for worker in self._workers:
            if worker.creating is not None:
                spec, run = worker.creating
                if not run.done():
                    continue
                worker.creating = None
                try:
                    run_id = run.resolve()
                except MlflowException as exc:
                    error = f"creating its run failed: {one_line(exc)}"
                    self._trials.end(spec, "FAILED", error)
                    continue
                self._trials.run_ids[spec.number] = run_id
                worker.give(dataclasses.replace(spec, run_id=run_id))
            elif worker.ready and worker.trial is None and self._waiting:
                spec = self._waiting.popleft()
                worker.creating = (spec, self._trials.create_run(spec))
        if self._waiting and not self._workers:
            while self._waiting:
                spec = self._waiting.popleft()
                self._trials.end(spec, "FAILED", "not run: every worker process died")

    def _serve(self, worker: Worker, exited: bool) -> None:
        messages, closed = worker.receive()
        for message in messages:
            if isinstance(message, WorkerReady):
                worker.ready = True
                if self._stop.is_set():
                    worker.give(None)
            elif isinstance(message, Progress):
                self._trials.progress(message)
            elif isinstance(message, Snapshot):
                self._trials.snapshot(message)
            else:
                worker.trial = None
                self._trials.result(message)
        if exited or closed:
            self._workers.remove(worker)
            worker.stop(EXIT_SECONDS)
            why = f"its worker process died (exit code {worker.process.exitcode})"
            self._abandon(worker, "FAILED", why)

    def _abandon(self, worker: Worker, status: str, error: str) -> None:
        """End the trial a worker holds, or whose run is being created for it, from here."""
        if worker.creating is not None:
            spec, run = worker.creating
            worker.creating = None
            self._trials.end(spec, status, "not started" if status == "KILLED" else error, run)
        if worker.trial is not None and worker.trial.number not in self._trials.results:
            self._trials.end(worker.trial, status, error)
        worker.trial = None

    def _interrupt(self) -> None:
        """The first Ctrl-C: no new trial; the running ones stop at their next epoch."""
        self._stop.set()
        unstarted = len(self._waiting)
        while self._waiting:  # one line for them all, below: a sweep may have thousands
            spec = self._waiting.popleft()
            self._trials.result(
                TrialResult(spec.number, None, "KILLED", spec.params, {}, 0, 0.0, "not started"),
                echo=False,
            )
        running = []
        creating = []  # runs created for trials not yet sent: they exist, or will
        for worker in list(self._workers):
            if worker.creating is not None:
                creating.append(worker.creating)
                worker.creating = None
            if worker.trial is not None:
                running.append(worker.trial.number)
            elif worker.ready:
                worker.give(None)
            else:  # still starting up: it holds nothing, and need not finish its imports
                self._workers.remove(worker)
                worker.stop(0)
        what = (
            f"stopping the running trial(s): {', '.join(map(str, sorted(running)))}"
            if running
            else "no trial is running"
        )
        self._trials.view.note(
            f"interrupted: no new trial starts ({unstarted} not started); {what} "
            "(Ctrl-C again to kill them)"
        )
        for spec, run in creating:
            self._trials.end(spec, "KILLED", "not started", run)
        self._deadline = time.monotonic() + STOP_GRACE_SECONDS

    def close(self) -> None:
        """Stop every worker, then end as KILLED the trials that did not end (their runs
        terminated from here).

        Once every trial ended, workers are told to exit (their clients close and flush);
        after a Ctrl-C they are terminated at once, since a worker that returned its result has
        already terminated and flushed its run, and a clean exit costs seconds of interpreter
        shutdown.
        """
        graceful = self._trials.done and not self._ctrl_c.pressed
        for worker in self._workers:
            if graceful:
                worker.give(None)
        for worker in self._workers:
            worker.stop(EXIT_SECONDS if graceful else 0)
            messages, _ = worker.receive()  # its last words: a result that just came
            for message in messages:
                if isinstance(message, Progress):
                    self._trials.progress(message)
                elif isinstance(message, Snapshot):
                    self._trials.snapshot(message)
                elif isinstance(message, TrialResult):
                    worker.trial = None
                    self._trials.result(message)
            self._abandon(worker, "KILLED", "killed: the sweep was interrupted")
        self._workers.clear()
        for spec in self._trials.specs:  # never handed out
            if spec.number not in self._trials.results:
                self._trials.end(spec, "KILLED", "not started")


def run_trials(
    client: QueueingClient, specs: list[TrialSpec], workers: int, view: View, ctrl_c: CtrlC
) -> Trials:
    """Run every trial in spawned worker processes, showing their progress as it comes;
    return the trials, their results and what their workers reported.

    On Ctrl-C no new trial starts and the running ones end as KILLED at their next epoch
    (killed after :data:`STOP_GRACE_SECONDS`); a second Ctrl-C kills the workers at once. No
    worker process outlives this call.
    """
    context = multiprocessing.get_context("spawn")
    trials = Trials(client, specs, view)
    pool = Pool(trials, context.Event(), ctrl_c)
    try:
        pool.start(workers, cloudpickle.dumps(client))
        pool.run()
    finally:
        pool.close()
    return trials
