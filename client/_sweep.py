"""``runactors sweep``: a real hyperparameter sweep logged through :class:`QueueingClient`.

Each trial trains a scikit-learn ``SGDClassifier`` epoch by epoch (``partial_fit``) on the
digits dataset that scikit-learn bundles, in a worker process started with the *spawn*
context. The parent process creates the sweep's parent run and sends every worker a
cloudpickled copy of its client (configuration only); each worker logs its trials as child
runs through its own actors (one client per worker process, reused across its trials, with
one executor worker: a trial logs one run at a time). The parent hands out the trials one at
a time over each worker's pipe, on which the worker reports its progress and results.

Ctrl-C is handled by the parent alone. Workers are spawned with SIGINT blocked and then ignore
it, so a Ctrl-C (which a terminal sends to every process of the group) never breaks one, even
mid-import. The first Ctrl-C stops handing out trials and asks the running ones to stop at
their next epoch, so their runs end as KILLED; a second one, or a trial that does not stop
within :data:`STOP_GRACE_SECONDS`, gets its worker killed and its run terminated by the
parent. The parent run ends KILLED and the command exits with status 130.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import multiprocessing
import multiprocessing.connection
import os
import random
import shlex
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import click
import cloudpickle
import numpy as np
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from client import _tracking_uri as tracking_uris
from client._client import QueueingClient

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from client import PendingRunId

DEFAULT_EXPERIMENT = "runactors-sweep"
DEFAULT_DB = "mlflow.db"
TRIAL_TAG = "runactors.trial"
SWEEP_TAG = "runactors.sweep"

# The search space: each trial is one point of this grid, drawn in a seeded random order.
GRID: dict[str, tuple[Any, ...]] = {
    "loss": ("hinge", "log_loss", "modified_huber"),
    "alpha": (1e-5, 1e-4, 1e-3, 1e-2),
    "learning_rate": ("constant", "invscaling"),
    "eta0": (0.001, 0.01, 0.1),
}
SCORE = "val_accuracy"  # what "best trial" means

# How long the up-front check waits for a tracking server before calling it unreachable.
CHECK_TIMEOUT_SECONDS = "5"

# After a Ctrl-C, how long the running trials get to stop at an epoch boundary (terminating
# their runs themselves, with their last metrics flushed) before their workers are killed.
STOP_GRACE_SECONDS = 10.0
# How long a worker process gets to exit once told to (its client flushes) before it is killed.
EXIT_SECONDS = 10.0

Echo = Callable[[str], None]


# -- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class SweepOptions:
    """What ``runactors sweep`` was asked to do."""

    trials: int = 8
    epochs: int = 10
    workers: int = 2
    executor: Literal["thread", "process"] = "thread"
    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    seed: int = 0
    fail_trial: int | None = None  # 1-based trial number forced to raise (for tests)


def resolve_tracking_uri(uri: str | None) -> str:
    """The store every process logs to: ``sqlite:///mlflow.db`` in the current folder by
    default, else ``uri`` checked as a client checks it, with any relative SQLite path made
    absolute, so that worker processes (and the ``mlflow ui`` command in the summary) find
    the same file whatever their folder. Raises ``click.UsageError``."""
    if uri is None or not uri.strip():
        return f"sqlite:///{Path(os.getcwd(), DEFAULT_DB)}"
    try:
        return tracking_uris.resolve_tracking_uri(uri.strip())
    except MlflowException as exc:
        raise click.UsageError(exc.message) from None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as a single line of at most ``limit`` characters."""
    text = exc.message if isinstance(exc, MlflowException) else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prepare_sqlite_folder(uri: str) -> None:
    """Create the SQLite file's folder (as MLflow would), failing with a clear message."""
    path = tracking_uris.sqlite_path(uri)
    if path is None:
        return
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(
            f"Cannot use the SQLite store {path}: cannot create its folder {folder} "
            f"({exc.strerror or exc})."
        ) from None
    if not os.access(folder, os.W_OK):
        raise click.ClickException(
            f"Cannot use the SQLite store {path}: its folder {folder} is not writable."
        )


@contextlib.contextmanager
def _fail_fast_http() -> Iterator[None]:
    """Within the block, MLflow's HTTP calls are made once, with a short timeout."""
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": CHECK_TIMEOUT_SECONDS,
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def prepare_experiment(uri: str, name: str) -> str:
    """Check that the store answers, then get or create the experiment; return its ID.

    Done up front, failing fast, so that a wrong URI ends in one line instead of a sweep
    whose every run fails. Raises ``click.ClickException``.
    """
    from mlflow.tracking import MlflowClient

    _prepare_sqlite_folder(uri)
    try:
        with _fail_fast_http():
            store = MlflowClient(tracking_uri=uri)
            store.search_experiments(max_results=1)
            return _get_or_create_experiment(store, name)
    except click.ClickException:
        raise
    except Exception as exc:
        raise click.ClickException(
            f"Cannot use the tracking store {uri}: {_one_line(exc)}"
        ) from None


def _get_or_create_experiment(store: Any, name: str) -> str:
    experiment = store.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(store.create_experiment(name))
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = store.get_experiment_by_name(name)  # created meanwhile
    if experiment.lifecycle_stage != "active":
        raise click.ClickException(
            f"The experiment {name!r} is deleted: restore it or choose another --experiment."
        )
    return str(experiment.experiment_id)


# -- the trials -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSpec:
    """One trial, as sent to a worker."""

    number: int  # 1-based
    params: dict[str, Any]
    epochs: int
    seed: int
    experiment_id: str
    parent_run_id: str
    fail: bool = False
    run_id: str | None = None  # created by the parent as it hands the trial out


@dataclass(frozen=True)
class Progress:
    """What a worker tells the parent: a trial started (its run exists) or ended an epoch."""

    trial: int
    run_id: str
    epoch: int | None = None  # None: the trial's run was just created
    metrics: dict[str, float] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)  # the worker client's run states
    logged: int = 0  # metric points the store acknowledged so far
    queued: int = 0  # metric points queued or in flight
    pid: int | None = None  # the worker process (on the "started" event)


@dataclass(frozen=True)
class TrialResult:
    """How a trial ended."""

    number: int
    run_id: str | None
    status: str  # FINISHED, FAILED or KILLED
    params: dict[str, Any]
    metrics: dict[str, float]  # the last epoch's
    points: int  # metric points the store acknowledged
    seconds: float
    error: str | None = None


def sample_trials(trials: int, seed: int) -> list[dict[str, Any]]:
    """``trials`` points of :data:`GRID` in a seeded random order (repeating past its size)."""
    names = list(GRID)
    points = [dict(zip(names, values, strict=True)) for values in itertools.product(*GRID.values())]
    random.Random(seed).shuffle(points)
    return [points[i % len(points)] for i in range(trials)]


@dataclass(frozen=True)
class Digits:
    """scikit-learn's digits, split once per process, and the inputs that describe it."""

    x_train: NDArray[np.float64]
    y_train: NDArray[np.int64]
    x_val: NDArray[np.float64]
    y_val: NDArray[np.int64]
    classes: NDArray[np.int64]
    inputs: list[DatasetInput]


@functools.lru_cache(maxsize=1)
def load_digits() -> Digits:
    """Load and split the digits (1,797 8x8 images) with a fixed seed, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    x, y = sklearn_digits(return_X_y=True)
    x = x / 16.0
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    inputs = [
        _dataset_input(x_train, y_train, "digits-train", "training"),
        _dataset_input(x_val, y_val, "digits-val", "validation"),
    ]
    return Digits(x_train, y_train, x_val, y_val, np.unique(y), inputs)


def _dataset_input(
    x: NDArray[np.float64], y: NDArray[np.int64], name: str, context: str
) -> DatasetInput:
    """A ``DatasetInput`` entity for ``log_inputs``, its source the file scikit-learn ships."""
    import sklearn.datasets  # type: ignore[import-untyped]
    from mlflow.data.numpy_dataset import from_numpy

    source = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that the URI is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source")
        dataset = from_numpy(x, targets=y, source=source.as_uri(), name=name)
    return DatasetInput(
        dataset._to_mlflow_entity(), [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
    )


def evaluate(model: Any, data: Digits) -> dict[str, float]:
    """Training and validation accuracy, and the validation cross-entropy of the softmax of
    the decision scores (comparable across the grid's losses, not all of which give
    probabilities)."""
    scores = model.decision_function(data.x_val)
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.searchsorted(data.classes, data.y_val)
    return {
        "train_accuracy": float(model.score(data.x_train, data.y_train)),
        "val_accuracy": float(np.mean(data.classes[scores.argmax(axis=1)] == data.y_val)),
        "val_loss": float(-log_probs[np.arange(len(rows)), rows].mean()),
    }


class TrialStopped(Exception):
    """Raised in a trial when the parent asked the workers to stop (the user pressed Ctrl-C)."""


@dataclass(frozen=True)
class WorkerReady:
    """What a worker tells the parent once it runs our code: it can take a trial."""

    pid: int


# What a worker sends the parent over its pipe, in order: ready, then per trial its progress
# events and its result (a trial's last event therefore always arrives before its result).
Message = WorkerReady | Progress | TrialResult

# Set in each worker by serve_trials: the parent's end of the pipe, and its request to stop.
_parent: Connection | None = None
_stop: EventType | None = None


def serve_trials(conn: Connection, stop: EventType, payload: bytes) -> None:
    """A worker process: run the trials the parent sends, one at a time, until it sends None.

    The worker starts with SIGINT blocked (inherited from the parent, which blocks it around
    the spawn), so a Ctrl-C cannot break its seconds of imports; here it ignores SIGINT for
    good, which the processes it starts inherit. Ctrl-C is the parent's to handle: it sets
    ``stop``, so a trial ends at an epoch boundary with its run terminated.
    """
    global _parent, _stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _parent, _stop = conn, stop
    conn.send(WorkerReady(os.getpid()))
    while True:
        try:
            spec: TrialSpec | None = conn.recv()
        except EOFError:  # the parent is gone
            return
        if spec is None:
            return
        try:
            result = run_trial(payload, spec)
        except Exception as exc:  # the client could not be unpickled, say: this trial fails
            error = f"{type(exc).__name__}: {_one_line(exc)}"
            result = TrialResult(spec.number, None, "FAILED", spec.params, {}, 0, 0.0, error)
        conn.send(result)


def _report(event: Progress) -> None:
    if _parent is not None:
        _parent.send(event)


def _stopping() -> bool:
    return _stop is not None and _stop.is_set()


def _check_stop(spec: TrialSpec) -> None:
    if _stopping():
        raise TrialStopped(f"trial {spec.number} stopped: the sweep was interrupted")


def _metric_counts(client: QueueingClient, run_id: str) -> tuple[dict[str, int], int, int]:
    """The client's run states, and the trial run's metric points logged and still queued."""
    status = client.status()
    states = status.counts()
    runs = [r for r in status.runs if r.run_id == run_id]
    logged = sum(r.logged["metrics"] for r in runs)
    return states, logged, sum(r.queued["metrics"] for r in runs)


def train(client: QueueingClient, run_id: str, spec: TrialSpec, data: Digits) -> dict[str, float]:
    """Train one model epoch by epoch, logging each epoch's metrics; return the last ones.

    Each epoch's metrics are flushed asynchronously, so the store fills while training goes on.
    """
    from sklearn.linear_model import SGDClassifier  # type: ignore[import-untyped]

    model = SGDClassifier(**spec.params, random_state=spec.seed)
    order = np.random.default_rng(spec.seed)
    fail_at = min(1, spec.epochs - 1) if spec.fail else None
    metrics: dict[str, float] = {}
    for epoch in range(spec.epochs):
        _check_stop(spec)
        if epoch == fail_at:
            raise RuntimeError(f"forced failure of trial {spec.number} at epoch {epoch}")
        shuffled = order.permutation(len(data.y_train))
        model.partial_fit(data.x_train[shuffled], data.y_train[shuffled], classes=data.classes)
        metrics = evaluate(model, data)
        client.log_metrics(run_id, metrics, step=epoch)
        client.flush(synchronous=False)
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
        status, error = "FAILED", f"{type(exc).__name__}: {_one_line(exc)}"
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
        client.flush()
        points = _metric_counts(client, run_id)[1]
    except MlflowException as exc:
        status, error = "FAILED", error or f"logging failed: {_one_line(exc)}"
    return status, error, points


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
    client.log_params(run_id, {**spec.params, "epochs": spec.epochs, "seed": spec.seed})
    client.set_tags(run_id, {"model": "SGDClassifier", "dataset": "digits"})
    client.log_inputs(run_id, load_digits().inputs)
    client.flush(synchronous=False)


def create_trial_run(client: QueueingClient, spec: TrialSpec) -> PendingRunId:
    """Queue the creation of a trial's child run, in the parent: so the parent knows every
    trial run that exists, and can terminate it whatever becomes of the trial's worker."""
    tags = {MLFLOW_PARENT_RUN_ID: spec.parent_run_id, TRIAL_TAG: str(spec.number)}
    run = client.create_run(spec.experiment_id, tags=tags, run_name=f"trial-{spec.number}")
    client.flush(synchronous=False)
    return run


# -- the sweep, in the parent process ---------------------------------------------------


@dataclass
class SweepSummary:
    """The outcome of a sweep."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    results: list[TrialResult]
    seconds: float

    @property
    def finished(self) -> list[TrialResult]:
        return [result for result in self.results if result.status == "FINISHED"]

    @property
    def failures(self) -> list[TrialResult]:
        return [result for result in self.results if result.status != "FINISHED"]

    @property
    def best(self) -> TrialResult | None:
        """The finished trial with the highest final :data:`SCORE` (NaN counts as lowest)."""
        scored = [r for r in self.finished if not np.isnan(r.metrics.get(SCORE, np.nan))]
        return max(scored, key=lambda r: r.metrics[SCORE], default=None)

    @property
    def points(self) -> int:
        return sum(result.points for result in self.results)


def run_sweep(options: SweepOptions, echo: Echo) -> SweepSummary:
    """Run the sweep described by ``options``, printing progress lines through ``echo``.

    Raises ``click.ClickException`` for a store that cannot be used or a client that cannot
    be made; a failing trial does not raise. A Ctrl-C raises ``KeyboardInterrupt`` once the
    sweep has stopped: its trials ended (KILLED unless they had finished) and its parent run
    terminated (KILLED, unless every trial had already ended).
    """
    uri = resolve_tracking_uri(options.tracking_uri)
    try:
        # One executor worker per client: each trial process logs one run at a time.
        client = QueueingClient(uri, executor=options.executor, max_workers=1)
    except MlflowException as exc:
        raise click.ClickException(_one_line(exc)) from None
    experiment_id = prepare_experiment(uri, options.experiment)
    started = time.monotonic()
    ctrl_c = CtrlC()
    with ctrl_c.installed():
        with sigint_held():  # the client's threads and worker processes inherit the block
            parent, parent_id = _start_parent(client, options, experiment_id)
        workers = min(options.workers, options.trials)
        try:
            if ctrl_c.pressed:
                raise KeyboardInterrupt
            echo(
                f"sweep: {options.trials} trials x {options.epochs} epochs on {workers} "
                f"spawned worker(s), {options.executor} executor; parent run {parent_id} in "
                f"experiment {options.experiment!r} (ID {experiment_id}) at {uri}"
            )
            specs = trial_specs(options, experiment_id, parent_id)
            results = _run_trials(client, specs, workers, echo, ctrl_c)
        except BaseException:
            _end_parent(client, parent, None, "KILLED")
            raise
        summary = SweepSummary(uri, experiment_id, parent_id, results, time.monotonic() - started)
        if ctrl_c.pressed and len(summary.finished) < len(results):
            _end_parent(client, parent, summary, "KILLED")
        else:  # a Ctrl-C after the last trial ended still exits as interrupted, below
            _end_parent(client, parent, summary, "FINISHED" if summary.finished else "FAILED")
    if ctrl_c.pressed:
        raise KeyboardInterrupt
    return summary


def trial_specs(options: SweepOptions, experiment_id: str, parent_id: str) -> list[TrialSpec]:
    """The sweep's trials, numbered from 1, each seeded differently."""
    return [
        TrialSpec(
            number=number,
            params=params,
            epochs=options.epochs,
            seed=options.seed + number,
            experiment_id=experiment_id,
            parent_run_id=parent_id,
            fail=number == options.fail_trial,
        )
        for number, params in enumerate(sample_trials(options.trials, options.seed), start=1)
    ]


def _start_parent(
    client: QueueingClient, options: SweepOptions, experiment_id: str
) -> tuple[PendingRunId, str]:
    """Create the sweep's parent run and wait for its ID, which every trial's run names."""
    parent = client.create_run(
        experiment_id, tags={SWEEP_TAG: "parent"}, run_name=f"sweep-{time.strftime('%H%M%S')}"
    )
    client.log_params(
        parent,
        {
            "trials": options.trials,
            "epochs": options.epochs,
            "workers": options.workers,
            "executor": options.executor,
            "seed": options.seed,
            "model": "SGDClassifier",
            "dataset": "digits",
        },
    )
    try:
        client.flush()
        return parent, parent.resolve()
    except MlflowException as exc:
        with contextlib.suppress(MlflowException):
            client.close()
        raise click.ClickException(f"Cannot create the sweep's run: {_one_line(exc)}") from None


def _end_parent(
    client: QueueingClient, parent: PendingRunId, summary: SweepSummary | None, status: str
) -> None:
    """Log the sweep's outcome on its parent run, terminate it and close the client."""
    try:
        if summary is not None:
            best = summary.best
            client.log_metrics(
                parent,
                {
                    "trials_finished": len(summary.finished),
                    "trials_failed": len(summary.failures),
                    "metric_points": summary.points,
                    "sweep_seconds": summary.seconds,
                    **({f"best_{SCORE}": best.metrics[SCORE]} if best else {}),
                },
            )
            if best is not None and best.run_id is not None:
                client.set_tags(parent, {"best_run_id": best.run_id})
        client.set_terminated(parent, status)
    finally:
        try:
            client.close()
        except MlflowException as exc:
            raise click.ClickException(
                f"Logging the sweep's parent run failed: {_one_line(exc)}"
            ) from None


class CtrlC:
    """The parent's SIGINT handler while the sweep runs: the first Ctrl-C is noted (the sweep
    then starts no new trial and stops the running ones at their next epoch), the second
    raises ``KeyboardInterrupt`` (the workers are then killed at once).

    Noting rather than raising lets the parent react at points of its choosing: an exception
    raised in the middle of a pipe read or of the client's flush would leave either broken.
    """

    def __init__(self) -> None:
        self.presses = 0

    @property
    def pressed(self) -> bool:
        return self.presses > 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.presses += 1
        if self.presses > 1:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Within the block, SIGINT goes to this handler (in the main thread only: Python runs
        signal handlers there; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Within the block, SIGINT is blocked in this thread, and so in every thread and process
    started from it, which inherit the mask: a spawned interpreter imports for seconds before
    any of our code can ignore the signal, and a Ctrl-C meanwhile would kill it. The parent
    itself still sees the signal (the kernel hands it to a thread that does not block it, or
    to this one when the block ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Trials:
    """The parent's view of the trials: it echoes their progress, collects their results, and
    terminates from the parent the runs of trials whose worker could not."""

    def __init__(self, client: QueueingClient, specs: list[TrialSpec], echo: Echo) -> None:
        self._client = client
        self.specs = specs
        self._echo = echo
        self._started = time.monotonic()
        self.run_ids: dict[int, str] = {}
        self.results: dict[int, TrialResult] = {}

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.specs)

    def progress(self, event: Progress) -> None:
        self.run_ids[event.trial] = event.run_id
        self._echo(_progress_line(event, len(self.specs), self._started))

    def result(self, result: TrialResult, echo: bool = True) -> None:
        self.results[result.number] = result
        if echo:
            self._echo(_result_line(result, len(self.specs), self._started))

    def create_run(self, spec: TrialSpec) -> PendingRunId:
        return create_trial_run(self._client, spec)

    def end(
        self, spec: TrialSpec, status: str, error: str, creating: PendingRunId | None = None
    ) -> None:
        """End a trial that its worker did not end: terminate its run, if there is one (or
        will be: ``creating``, queued after its creation)."""
        run_id = self.run_ids.get(spec.number)
        run = creating if creating is not None else run_id
        if run is not None:
            self._client.set_terminated(run, status)
        self.result(TrialResult(spec.number, run_id, status, spec.params, {}, 0, 0.0, error))

    def sorted_results(self) -> list[TrialResult]:
        return [self.results[number] for number in sorted(self.results)]


class _Worker:
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


class _Pool:
    """The sweep's worker processes, fed one trial at a time by the parent.

    The parent, not a pool thread, hands out the trials, so it knows at every moment which
    trial each worker holds: after a Ctrl-C no trial is handed out, and the parent knows which
    ones to wait for. It waits on the workers' pipes and their process sentinels together, so
    a worker that dies (killed, crashed, out of memory) is seen at once and fails only its own
    trial; nothing waits on a result that cannot come.
    """

    def __init__(self, trials: _Trials, stop: EventType, ctrl_c: CtrlC, echo: Echo) -> None:
        self._trials = trials
        self._stop = stop
        self._ctrl_c = ctrl_c
        self._echo = echo
        self._waiting = collections.deque(trials.specs)
        self._workers: list[_Worker] = []
        self._deadline: float | None = None  # set by a Ctrl-C: when running trials get killed

    def start(self, count: int, payload: bytes) -> None:
        context = multiprocessing.get_context("spawn")
        with sigint_held():
            for _ in range(count):
                if self._ctrl_c.pressed:
                    return
                self._workers.append(_Worker(context, self._stop, payload))

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
                    error = f"creating its run failed: {_one_line(exc)}"
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

    def _serve(self, worker: _Worker, exited: bool) -> None:
        messages, closed = worker.receive()
        for message in messages:
            if isinstance(message, WorkerReady):
                worker.ready = True
                if self._stop.is_set():
                    worker.give(None)
            elif isinstance(message, Progress):
                self._trials.progress(message)
            else:
                worker.trial = None
                self._trials.result(message)
        if exited or closed:
            self._workers.remove(worker)
            worker.stop(EXIT_SECONDS)
            why = f"its worker process died (exit code {worker.process.exitcode})"
            self._abandon(worker, "FAILED", why)

    def _abandon(self, worker: _Worker, status: str, error: str) -> None:
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
        self._echo(
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
                elif isinstance(message, TrialResult):
                    worker.trial = None
                    self._trials.result(message)
            self._abandon(worker, "KILLED", "killed: the sweep was interrupted")
        self._workers.clear()
        for spec in self._trials.specs:  # never handed out
            if spec.number not in self._trials.results:
                self._trials.end(spec, "KILLED", "not started")


def _run_trials(
    client: QueueingClient, specs: list[TrialSpec], workers: int, echo: Echo, ctrl_c: CtrlC
) -> list[TrialResult]:
    """Run every trial in spawned worker processes, echoing their progress as it comes.

    On Ctrl-C no new trial starts and the running ones end as KILLED at their next epoch
    (killed after :data:`STOP_GRACE_SECONDS`); a second Ctrl-C kills the workers at once. No
    worker process outlives this call.
    """
    context = multiprocessing.get_context("spawn")
    trials = _Trials(client, specs, echo)
    pool = _Pool(trials, context.Event(), ctrl_c, echo)
    try:
        pool.start(workers, cloudpickle.dumps(client))
        pool.run()
    finally:
        pool.close()
    return trials.sorted_results()


# -- output -----------------------------------------------------------------------------


def _clock(started: float) -> str:
    return f"[{time.monotonic() - started:6.1f}s]"


def _metrics_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.3f}" for key, value in metrics.items())


def _progress_line(event: Progress, trials: int, started: float) -> str:
    where = f"{_clock(started)} trial {event.trial}/{trials}"
    if event.epoch is None:
        return f"{where} started: run {event.run_id} (worker pid {event.pid})"
    states = ", ".join(f"{state} {n}" for state, n in sorted(event.states.items()))
    return (
        f"{where} epoch {event.epoch + 1}  {_metrics_text(event.metrics)}  "
        f"| actors: {states}; points logged {event.logged}, queued {event.queued}"
    )


def _result_line(result: TrialResult, trials: int, started: float) -> str:
    line = f"{_clock(started)} trial {result.number}/{trials} {result.status}"
    if result.metrics:
        line += f"  {SCORE} {result.metrics.get(SCORE, float('nan')):.3f}"
    line += f"  ({result.points} points in {result.seconds:.1f} s)"
    return line + (f": {result.error}" if result.error else "")


def ui_command(uri: str) -> str:
    """How to look at the sweep: the server itself, or ``mlflow ui`` on the store."""
    if uri.lower().startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def summary_lines(summary: SweepSummary) -> list[str]:
    """The end-of-sweep report."""
    best = summary.best
    rate = summary.points / summary.seconds if summary.seconds > 0 else 0.0
    lines = [
        f"done in {summary.seconds:.1f} s: {len(summary.results)} trial runs "
        f"({len(summary.finished)} finished, {len(summary.failures)} failed) under parent run "
        f"{summary.parent_run_id}",
    ]
    if best is None:
        lines.append("best trial: none (no trial finished)")
    else:
        params = ", ".join(f"{key}={value}" for key, value in best.params.items())
        lines.append(
            f"best trial: trial {best.number} ({SCORE} {best.metrics[SCORE]:.4f}) "
            f"run {best.run_id}; {params}"
        )
    lines.append(f"metric points logged: {summary.points} ({rate:.1f} points/s)")
    lines.append(f"failures: {len(summary.failures)}")
    lines.extend(f"  trial {r.number}: {r.error or r.status}" for r in summary.failures)
    lines.append(f"view: {ui_command(summary.tracking_uri)}")
    return lines
