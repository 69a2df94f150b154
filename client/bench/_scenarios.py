"""The scenarios, one per row of the speed goals: each runs its contenders interleaved, in
this process, each round on a fresh store, and states its ratios against the goal.

Ratios are runactors' throughput over the baseline's (higher is better), except the hot
path's, which is runactors' cost per call over the seed's (lower is better); ``scale-10k``
reports absolute figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.utils.autologging_utils import MlflowAutologgingQueueingClient as SeedClient

from actors import create_sqlite_store, python_main
from client._client import QueueingClient
from client.bench import _postgres
from client.bench._contenders import Contender, DirectLoop, Queueing, Workload
from client.bench._results import Measurement, Ratio, ScenarioResult, throughput_ratio
from client.bench._server import LocalServer

HOT_RUN_ID = "0" * 32  # never flushed: the hot path only queues


@dataclass(frozen=True)
class Options:
    rounds: int = 2
    max_workers: int | None = None  # the client's default
    calls: int = 20_000  # hot path: calls per timing round
    repeat: int = 7  # hot path: rounds, the best is kept
    runs: int = 8  # long runs: runs
    steps: int = 1_000  # long runs: steps of 2 metrics
    small_runs: int = 300  # small runs: runs of 10 metrics
    server_runs: int = 8
    server_steps: int = 500
    scale_runs: int = 10_000


def _runactors(executor: str, options: Options) -> Callable[[str], QueueingClient]:
    def make(uri: str) -> QueueingClient:
        return QueueingClient(uri, executor=executor, max_workers=options.max_workers)  # type: ignore[arg-type]

    return make


def _new_sqlite_store(folder: str, name: str) -> str:
    """A fresh SQLite store with MLflow's tables made (untimed: every contender pays it),
    without MLflow's "Creating initial MLflow database tables" lines among the bench's."""
    uri = f"sqlite:///{folder}/{name}.db"
    create_sqlite_store(uri)
    return uri


def _interleaved(
    contenders: list[Contender], workload: Workload, rounds: int, store: Callable[[int], str]
) -> list[Measurement]:
    """Each round runs every contender once, in an order that alternates between rounds, on
    the store ``store(n)`` gives for the n-th measurement."""
    seconds: dict[str, list[float]] = {c.name: [] for c in contenders}
    n = 0
    for round_ in range(rounds):
        order = contenders if round_ % 2 == 0 else list(reversed(contenders))
        for contender in order:
            seconds[contender.name].append(contender.measure(store(n), workload))
            n += 1
    return [Measurement(c.name, seconds[c.name], workload.points) for c in contenders]


def _on_sqlite(
    name: str,
    title: str,
    ours: Contender,
    workload: Workload,
    goal: float,
    options: Options,
) -> ScenarioResult:
    base = DirectLoop()
    with tempfile.TemporaryDirectory() as folder:
        measurements = _interleaved(
            [base, ours], workload, options.rounds, lambda n: _new_sqlite_store(folder, f"s{n}")
        )
    result = ScenarioResult(name, title, measurements)
    result.ratios.append(
        throughput_ratio(
            f"{ours.name} / {base.name}",
            result.measurement(ours.name),
            result.measurement(base.name),
            goal,
        )
    )
    return result


def hot(options: Options, journal: bool = False) -> ScenarioResult:
    """Per-call cost of ``log_metrics(run, {2 metrics}, step)``: runactors vs the seed
    (``journal``: runactors with ``spool_dir``, its write-ahead journal writing meanwhile)."""
    with tempfile.TemporaryDirectory() as folder:
        uri = _new_sqlite_store(folder, "hot")
        spool_dir = os.path.join(folder, "spool") if journal else None
        seed, ours = SeedClient(uri), QueueingClient(uri, spool_dir=spool_dir)
        metrics = {"loss": 0.25, "accuracy": 0.9}

        def seed_call() -> None:
            seed.log_metrics(HOT_RUN_ID, metrics, step=1)

        def our_call() -> None:
            ours.log_metrics(HOT_RUN_ID, metrics, step=1)

        seed_call()
        our_call()
        per_call: dict[str, list[float]] = {"seed": [], "ours": [], "writer": []}
        # The journal's writer thread (private: the bench's view of runactors' inside): what
        # a round left unwritten is committed after it, timed on its own (the writer's share
        # of the cost, off the caller's thread), so that it never runs in the seed's rounds.
        spooler: Any = ours._get_session().spooler
        writer: Any = spooler.journal if journal else None
        for _ in range(options.repeat):  # interleaved: both see the same machine state
            for name, call in (("seed", seed_call), ("ours", our_call)):
                per_call[name].append(timeit.timeit(call, number=options.calls) / options.calls)
                if writer is not None and name == "ours":
                    began = time.perf_counter()
                    writer.commit()
                    per_call["writer"].append((time.perf_counter() - began) / options.calls)
            # Drop what was queued, so that memory stays flat across rounds.
            seed._pending_ops_by_run_id = {}
            ours._drop_queued()
            if writer is not None:
                writer.commit()  # the drop's deletes, untimed, before the next round
        ours.close()
    us = {name: [s * 1e6 for s in values] for name, values in per_call.items()}
    name = "runactors + journal" if journal else "runactors"
    seed_m = Measurement("mlflow queueing client", us["seed"], 0, unit="us")
    ours_m = Measurement(name, us["ours"], 0, unit="us")
    extra = [Measurement("journal commit, per call", us["writer"], 0, unit="us")] * journal
    ratio = Ratio(
        f"{name} / mlflow queueing client (per call)",
        [o / s for o, s in zip(us["ours"], us["seed"], strict=True)],
        ours_m.best / seed_m.best,
        goal=0.6 if journal else 0.5,
        higher_is_better=False,
    )
    return ScenarioResult(
        "hot-journal" if journal else "hot",
        "log_metrics with 2 metrics, per call (us)"
        + (", spool_dir set (the write-ahead journal)" if journal else ""),
        [seed_m, ours_m, *extra],
        [ratio],
    )


def hot_journal(options: Options) -> ScenarioResult:
    return hot(options, journal=True)


def sqlite_thread(options: Options) -> ScenarioResult:
    workload = Workload(options.runs, options.steps, 2)
    return _on_sqlite(
        "sqlite-thread",
        f"{workload.runs} runs x {workload.steps} steps x 2 metrics into SQLite, thread executor",
        Queueing("runactors thread", _runactors("thread", options)),
        workload,
        5.0,  # the SQL fast path's goal
        options,
    )


def sqlite_journal(options: Options) -> ScenarioResult:
    """The long runs with ``spool_dir``: every call journaled (within ``journal_interval``)
    and acknowledged, creations noted before they are sent."""
    workload = Workload(options.runs, options.steps, 2)
    with tempfile.TemporaryDirectory() as spool:

        def make(uri: str) -> QueueingClient:
            return QueueingClient(uri, max_workers=options.max_workers, spool_dir=spool)

        return _on_sqlite(
            "sqlite-journal",
            f"{workload.runs} runs x {workload.steps} steps x 2 metrics into SQLite, thread "
            "executor, spool_dir set (the write-ahead journal)",
            Queueing("runactors thread + journal", make),
            workload,
            4.0,
            options,
        )


def postgres_thread(options: Options) -> ScenarioResult:
    """The long runs into a throwaway PostgreSQL 15 server (direct URI) the scenario starts
    and stops; one database, a fresh experiment per measurement. Skipped, saying why, where
    the server binaries or the psycopg driver are missing."""
    workload = Workload(options.runs, options.steps, 2)
    return _on_postgres(
        "postgres-thread",
        f"{workload.runs} runs x {workload.steps} steps x 2 metrics into PostgreSQL 15, "
        "thread executor",
        workload,
        3.0,
        options,
    )


def _on_postgres(
    name: str, title: str, workload: Workload, goal: float, options: Options
) -> ScenarioResult:
    """The direct loop against runactors' thread executor on a throwaway PostgreSQL 15
    server; skipped, saying why, where the server binaries or the driver are missing."""
    reason = _postgres.missing()
    if reason is not None:
        return ScenarioResult(name, title, skipped=reason)
    base, ours = DirectLoop(), Queueing("runactors thread", _runactors("thread", options))
    with _postgres.LocalPostgres() as server:
        MlflowClient(server.uri).search_experiments(max_results=1)  # MLflow's tables, untimed
        measurements = _interleaved([base, ours], workload, options.rounds, lambda n: server.uri)
    result = ScenarioResult(name, title, measurements)
    result.ratios.append(
        throughput_ratio(
            f"{ours.name} / {base.name}",
            result.measurement(ours.name),
            result.measurement(base.name),
            goal,
        )
    )
    return result


def sqlite_process(options: Options) -> ScenarioResult:
    workload = Workload(options.runs, options.steps, 2)
    return _on_sqlite(
        "sqlite-process",
        f"{workload.runs} runs x {workload.steps} steps x 2 metrics into SQLite, process "
        "executor with its workers started",
        Queueing("runactors process", _runactors("process", options)),
        workload,
        1.5,
        options,
    )


def sqlite_process_cold(options: Options) -> ScenarioResult:
    workload = Workload(options.runs, options.steps, 2)
    return _on_sqlite(
        "sqlite-process-cold",
        f"{workload.runs} runs x {workload.steps} steps x 2 metrics into SQLite, process "
        "executor from cold (client creation, logging and flush timed)",
        Queueing("runactors process (cold)", _runactors("process", options), cold=True),
        workload,
        1.2,
        options,
    )


def small_runs_thread(options: Options) -> ScenarioResult:
    workload = Workload(options.small_runs, 1, 10)
    return _on_sqlite(
        "small-runs-thread",
        f"{workload.runs} small runs (10 metrics each) into SQLite, thread executor",
        Queueing("runactors thread", _runactors("thread", options)),
        workload,
        4.0,  # the SQL fast path for whole runs
        options,
    )


def small_runs_postgres(options: Options) -> ScenarioResult:
    """The small runs into a throwaway PostgreSQL 15 server, thread executor (as
    ``postgres-thread``: skipped, saying why, where the server or the driver is missing)."""
    workload = Workload(options.small_runs, 1, 10)
    return _on_postgres(
        "small-runs-postgres",
        f"{workload.runs} small runs (10 metrics each) into PostgreSQL 15, thread executor",
        workload,
        3.0,
        options,
    )


def small_runs_process(options: Options) -> ScenarioResult:
    workload = Workload(options.small_runs, 1, 10)
    return _on_sqlite(
        "small-runs-process",
        f"{workload.runs} small runs (10 metrics each) into SQLite, process executor",
        Queueing("runactors process", _runactors("process", options)),
        workload,
        3.0,  # the SQL fast path for whole runs
        options,
    )


def server_thread(options: Options) -> ScenarioResult:
    """Through a local ``mlflow server --workers 2``: one server for the scenario, a fresh
    experiment per measurement (starting a server per measurement would cost more than the
    measurement)."""
    workload = Workload(options.server_runs, options.server_steps, 2)
    ours = Queueing("runactors thread", _runactors("thread", options))
    direct = DirectLoop("mlflow client loop")
    seed = Queueing("mlflow queueing client", SeedClient)
    with tempfile.TemporaryDirectory() as folder, LocalServer(Path(folder)) as server:
        measurements = _interleaved(
            [direct, seed, ours], workload, options.rounds, lambda n: server.uri
        )
    result = ScenarioResult(
        "server-thread",
        f"{workload.runs} runs x {workload.steps} steps x 2 metrics through a local "
        "mlflow server (2 workers), thread executor",
        measurements,
    )
    for base in (direct, seed):
        result.ratios.append(
            throughput_ratio(
                f"{ours.name} / {base.name}",
                result.measurement(ours.name),
                result.measurement(base.name),
                1.1,
            )
        )
    return result


def scale(options: Options) -> ScenarioResult:
    """``scale_runs`` runs queued, one flush: absolute figures from a subprocess of its own."""
    root = str(Path(__file__).resolve().parents[2])  # where ``client`` is importable from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    # On tmpfs where there is one: the figures are runactors' (threads, memory, the return
    # of an asynchronous flush), and 30,000 fsync'ed commits would only make them slow to get.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=shm) as folder:
        uri = f"sqlite:///{folder}/scale.db"
        done = subprocess.run(
            # Not ``python -m``: a ``client/`` folder in the current folder would shadow ours.
            python_main("client.bench._scale", str(options.scale_runs), uri),
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"the scale measurement failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return ScenarioResult(
        "scale-10k",
        f"{options.scale_runs:,} runs queued, one flush (thread executor)",
        figures={key: float(value) for key, value in figures.items() if key != "runs"},
    )


SCENARIOS: dict[str, Callable[[Options], ScenarioResult]] = {
    "hot": hot,
    "hot-journal": hot_journal,
    "sqlite-thread": sqlite_thread,
    "sqlite-journal": sqlite_journal,
    "postgres-thread": postgres_thread,
    "sqlite-process": sqlite_process,
    "sqlite-process-cold": sqlite_process_cold,
    "small-runs-thread": small_runs_thread,
    "small-runs-process": small_runs_process,
    "small-runs-postgres": small_runs_postgres,
    "server-thread": server_thread,
    "scale-10k": scale,
}

# The goals of the absolute figures (lower is better), for the report.
SCALE_GOALS = {"flush_return_ms": 50.0, "peak_threads": 200.0, "peak_rss_mb": 400.0}
