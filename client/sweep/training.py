"""A worker process of the sweep: it runs the trials the parent sends, one at a time.

Each trial trains a scikit-learn ``SGDClassifier`` epoch by epoch (``partial_fit``) on the
digits and logs through the worker's copy of the parent's client (cloudpickled:
configuration only; one copy per process, reused across its trials, closed at exit). While
a trial runs, a thread sends the parent the client's ``status()`` every
:data:`SNAPSHOT_SECONDS`, so the parent sees every run actor's state live.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from typing import Any

import cloudpickle
import numpy as np
from mlflow.exceptions import MlflowException

from client._client import QueueingClient
from client.sweep.data import Digits, batch_metrics, evaluate, load_digits
from client.sweep.delivery import DeliveryClock
from client.sweep.messages import Message, Progress, Snapshot, TrialResult, TrialSpec, WorkerReady
from client.sweep.options import BATCH_SIZE, SNAPSHOT_SECONDS, one_line


class TrialStopped(Exception):
    """Raised in a trial when the parent asked the workers to stop (the user pressed Ctrl-C)."""


class _Parent:
    """This worker's line to the parent: messages sent whole (one sender at a time), and the
    status snapshots, sent by a thread while a trial runs."""

    def __init__(self, conn: Connection, stop: EventType) -> None:
        self.conn = conn
        self.stop = stop
        self.clock = DeliveryClock()
        self.client: QueueingClient | None = None
        self._send_lock = threading.Lock()
        self._trial_running = threading.Event()
        self._exiting = threading.Event()
        self._sent_final: set[str] = set()  # runs already sent in their final state
        self._snapshots = threading.Thread(
            target=self._send_snapshots, name="runactors-sweep-snapshots", daemon=True
        )

    def send(self, message: Message) -> None:
        with self._send_lock:
            self.conn.send(message)

    def trial_started(self, client: QueueingClient) -> None:
        self.client = client
        self.clock.count_points = lambda: sum(r.logged["metrics"] for r in client.status().runs)
        self._trial_running.set()
        if not self._snapshots.is_alive():
            self._snapshots.start()

    def trial_ended(self) -> None:
        """No more periodic snapshots; the last one, sent now, goes before the result."""
        self._trial_running.clear()
        self.snapshot(final=True)

    def snapshot(self, final: bool = False) -> None:
        """Send the client's status: its runs that changed since the last snapshot.

        Taken and sent under the send lock, so snapshots arrive in the order they were
        taken, and none taken during a trial arrives after that trial's final one."""
        client = self.client
        if client is None:
            return
        with self._send_lock:
            if not (final or self._trial_running.is_set()):
                return
            status = client.status().to_dict()
            runs = [run for run in status["runs"] if run["run_id"] not in self._sent_final]
            self._sent_final.update(
                run["run_id"] for run in runs if run["state"] in ("stopped", "closed")
            )
            status["runs"] = runs
            clock = self.clock
            self.conn.send(
                Snapshot(
                    os.getpid(),
                    status,
                    clock.seconds,
                    clock.call_seconds,
                    clock.startup_seconds or 0.0,
                    clock.startup_points,
                )
            )

    def _send_snapshots(self) -> None:
        while not self._exiting.wait(SNAPSHOT_SECONDS):
            try:
                self.snapshot()
            except (OSError, EOFError):  # the parent is gone
                return

    def close(self) -> None:
        self._exiting.set()
        if self._snapshots.is_alive():
            self._snapshots.join(1.0)  # a daemon: never waits on a parent that stopped reading


# Set in each worker by serve_trials.
_parent: _Parent | None = None


def serve_trials(conn: Connection, stop: EventType, payload: bytes) -> None:
    """A worker process: run the trials the parent sends, one at a time, until it sends None.

    The worker starts with SIGINT blocked (inherited from the parent, which blocks it around
    the spawn), so a Ctrl-C cannot break its seconds of imports; here it ignores SIGINT for
    good, which the processes it starts inherit. Ctrl-C is the parent's to handle: it sets
    ``stop``, so a trial ends at an epoch boundary with its run terminated.
    """
    global _parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    parent = _parent = _Parent(conn, stop)
    parent.send(WorkerReady(os.getpid()))
    try:
        while True:
            try:
                spec: TrialSpec | None = conn.recv()
            except EOFError:  # the parent is gone
                return
            if spec is None:  # the last word: the runs' final states (``stopped``)
                with contextlib.suppress(OSError, EOFError):
                    parent.snapshot(final=True)
                return
            try:
                result = run_trial(payload, spec)
            except Exception as exc:  # the client could not be unpickled, say: this trial fails
                error = f"{type(exc).__name__}: {one_line(exc)}"
                result = TrialResult(spec.number, None, "FAILED", spec.params, {}, 0, 0.0, error)
            try:
                parent.trial_ended()
                parent.send(result)
            except (OSError, EOFError):  # the parent is gone
                return
    finally:
        parent.close()


def _report(event: Progress) -> None:
    if _parent is not None:
        _parent.send(event)


def _clock() -> DeliveryClock:
    """The process's delivery clock (a throwaway one outside a worker, as in tests)."""
    return _parent.clock if _parent is not None else DeliveryClock()


def _check_stop(spec: TrialSpec) -> None:
    if _parent is not None and _parent.stop.is_set():
        raise TrialStopped(f"trial {spec.number} stopped: the sweep was interrupted")


def _metric_counts(client: QueueingClient, run_id: str) -> tuple[dict[str, int], int, int]:
    """The client's run states, and the trial run's metric points logged and still queued."""
    status = client.status()
    states = status.counts()
    runs = [r for r in status.runs if r.run_id == run_id]
    logged = sum(r.logged["metrics"] for r in runs)
    return states, logged, sum(r.queued["metrics"] for r in runs)


def train(client: QueueingClient, run_id: str, spec: TrialSpec, data: Digits) -> dict[str, float]:
    """Train one model epoch by epoch, logging each epoch's metrics (and with
    ``log_every_batch`` each mini-batch's); return the last epoch's metrics.

    Each epoch's metrics are flushed asynchronously, so the store fills while training goes on.
    """
    from sklearn.linear_model import SGDClassifier  # type: ignore[import-untyped]

    clock = _clock()
    model = SGDClassifier(**spec.params, random_state=spec.seed)
    order = np.random.default_rng(spec.seed)
    fail_at = min(1, spec.epochs - 1) if spec.fail else None
    batches = -(-len(data.y_train) // BATCH_SIZE)
    metrics: dict[str, float] = {}
    for epoch in range(spec.epochs):
        _check_stop(spec)
        if epoch == fail_at:
            raise RuntimeError(f"forced failure of trial {spec.number} at epoch {epoch}")
        shuffled = order.permutation(len(data.y_train))
        if spec.log_every_batch:
            for batch in range(batches):
                _check_stop(spec)
                rows = shuffled[batch * BATCH_SIZE : (batch + 1) * BATCH_SIZE]
                x, y = data.x_train[rows], data.y_train[rows]
                model.partial_fit(x, y, classes=data.classes)
                values = batch_metrics(model, x, y, data.classes)
                with clock.calling():
                    client.log_metrics(run_id, values, step=epoch * batches + batch)
        else:
            model.partial_fit(data.x_train[shuffled], data.y_train[shuffled], classes=data.classes)
        metrics = evaluate(model, data)
        with clock.calling():
            client.log_metrics(run_id, metrics, step=epoch)
            clock.flush(client)
        states, logged, queued = _metric_counts(client, run_id)
        _report(Progress(spec.number, run_id, epoch, metrics, states, logged, queued))
    return metrics


def run_trial(payload: bytes, spec: TrialSpec) -> TrialResult:
    """One trial, in a worker process: its child run (created by the parent) trained and
    terminated.

    ``payload`` is the parent's client, cloudpickled: its copy here binds to this process's
    actor system. A trial that raises ends as a FAILED run (the exception stays here); one
    stopped by the parent ends as KILLED.
    """
    started = time.monotonic()
    if spec.run_id is None:
        raise ValueError(f"trial {spec.number} was sent without its run")
    run_id = spec.run_id
    client = _client_for(payload)
    if _parent is not None:
        _parent.trial_started(client)
    _report(Progress(spec.number, run_id, pid=os.getpid()))
    metrics: dict[str, float] = {}
    error: str | None = None
    try:
        _check_stop(spec)  # handed out just before the parent's stop
        _describe_run(client, spec, run_id)
        metrics = train(client, run_id, spec, load_digits())
    except TrialStopped as exc:
        status, error = "KILLED", str(exc)
    except Exception as exc:
        status, error = "FAILED", f"{type(exc).__name__}: {one_line(exc)}"
    else:
        status = "FINISHED"
    status, error, points = _end_run(client, run_id, status, error)
    seconds = time.monotonic() - started
    return TrialResult(spec.number, run_id, status, spec.params, metrics, points, seconds, error)


def _end_run(
    client: QueueingClient, run_id: str, status: str, error: str | None
) -> tuple[str, str | None, int]:
    """Terminate the trial's run and flush; return the trial's status, error and metric
    points logged (a failed flush makes the trial FAILED)."""
    points = 0
    try:
        client.set_terminated(run_id, status)
        with _clock().delivering():
            client.flush()
        _await_final_state(client, run_id)
        points = _metric_counts(client, run_id)[1]
    except MlflowException as exc:
        status, error = "FAILED", error or f"logging failed: {one_line(exc)}"
    return status, error, points


FINAL_STATES = frozenset({"stopped", "crashed", "closed"})
FINAL_STATE_SECONDS = 2.0


def _await_final_state(client: QueueingClient, run_id: str) -> None:
    """Wait (briefly: its actor says so a moment after the flush ends) until the terminated
    run's actor reports its final state, so that the last snapshot shows it."""
    deadline = time.monotonic() + FINAL_STATE_SECONDS
    while time.monotonic() < deadline:
        runs = [r for r in client.status().runs if r.run_id == run_id]
        if all(r.state in FINAL_STATES for r in runs):
            return
        time.sleep(0.005)


# One client per worker process, reused by every trial it runs: its executor (threads or
# worker processes) starts once, not per trial. It is closed when the process exits.
_clients: dict[bytes, QueueingClient] = {}


def _client_for(payload: bytes) -> QueueingClient:
    client = _clients.get(payload)
    if client is None:
        client = _clients[payload] = cloudpickle.loads(payload)
    return client


def _describe_run(client: QueueingClient, spec: TrialSpec, run_id: str) -> None:
    """Queue the trial run's params, tags and inputs (sent with its first metrics)."""
    params: dict[str, Any] = {**spec.params, "epochs": spec.epochs, "seed": spec.seed}
    if spec.log_every_batch:
        params["batch_size"] = BATCH_SIZE
    client.log_params(run_id, params)
    client.set_tags(run_id, {"model": "SGDClassifier", "dataset": "digits"})
    client.log_inputs(run_id, load_digits().inputs)
    clock = _clock()
    with clock.calling():
        clock.flush(client)
