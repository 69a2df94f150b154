"""``runactors bench``: this client against MLflow's own queueing client, side by side.

Two measurements, each run for every contender in the same process, interleaved:

* the hot path: one ``log_metrics`` call with two metrics (what a training loop does every
  step), in microseconds per call, best of ``repeat`` rounds;
* flush throughput: ``runs`` pending runs with ``steps`` steps of two metrics each, created,
  logged, terminated and flushed into a fresh SQLite store, in metric points per second.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import click
from mlflow.tracking import MlflowClient
from mlflow.utils.autologging_utils import MlflowAutologgingQueueingClient as SeedClient

from client._client import QueueingClient

HOT_RUN_ID = "0" * 32  # never flushed: the hot path only queues


@dataclass
class HotPath:
    seed_us: float
    runactors_us: float

    @property
    def ratio(self) -> float:
        return self.runactors_us / self.seed_us


@dataclass
class Throughput:
    contender: str
    points: int
    seconds: float

    @property
    def points_per_second(self) -> float:
        return self.points / self.seconds


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def hot_path(calls: int = 20_000, repeat: int = 7) -> HotPath:
    """Per-call cost of ``log_metrics(run, {2 metrics}, step)`` for both clients."""
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/hot.db"
        seed, ours = SeedClient(uri), QueueingClient(uri)
        metrics = {"loss": 0.25, "accuracy": 0.9}

        def seed_call() -> None:
            seed.log_metrics(HOT_RUN_ID, metrics, step=1)

        def our_call() -> None:
            ours.log_metrics(HOT_RUN_ID, metrics, step=1)

        seed_call()
        our_call()
        best = {"seed": float("inf"), "ours": float("inf")}
        for _ in range(repeat):  # interleaved, so both see the same machine state
            for name, call in (("seed", seed_call), ("ours", our_call)):
                seconds = timeit.timeit(call, number=calls)
                best[name] = min(best[name], seconds / calls * 1e6)
            # Drop what was queued, so that memory stays flat across rounds.
            seed._pending_ops_by_run_id = {}
            ours._drop_queued()
        ours.close()
    return HotPath(seed_us=best["seed"], runactors_us=best["ours"])


def _log_workload(client: Any, experiment_id: str, runs: int, steps: int) -> int:
    pending = [client.create_run(experiment_id, run_name=f"bench-{i}") for i in range(runs)]
    for step in range(steps):
        for run in pending:
            client.log_metrics(run, {"loss": 1.0 / (step + 1), "accuracy": step / steps}, step)
    for run in pending:
        client.set_terminated(run)
    return runs * steps * 2


def throughput(contender: str, make: Callable[[str], Any], runs: int, steps: int) -> Throughput:
    """Time one flush of the workload by a fresh client on a fresh store (workers warmed up)."""
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/bench.db"
        store = MlflowClient(uri)
        experiment_id = store.create_experiment("bench")
        client = make(uri)
        _log_workload(client, store.create_experiment("warm-up"), 2, 1)
        client.flush()  # start executors and workers, open connections
        points = _log_workload(client, experiment_id, runs, steps)
        start = time.perf_counter()
        client.flush()
        seconds = time.perf_counter() - start
        if hasattr(client, "close"):
            client.close()
        stored = len(store.search_runs([experiment_id], max_results=runs + 1))
        if stored != runs:
            raise RuntimeError(f"{contender}: {stored} of {runs} runs were stored")
    return Throughput(contender, points, seconds)


def contenders(max_workers: int | None) -> dict[str, Callable[[str], Any]]:
    return {
        "mlflow seed client": SeedClient,
        "runactors thread": lambda uri: QueueingClient(uri, max_workers=max_workers),
        "runactors process": lambda uri: QueueingClient(
            uri, executor="process", max_workers=max_workers
        ),
    }


def to_dict(hot: HotPath, flushes: list[Throughput]) -> dict[str, Any]:
    return {
        "machine": machine(),
        "hot_path": {**asdict(hot), "ratio": hot.ratio},
        "throughput": [{**asdict(t), "points_per_second": t.points_per_second} for t in flushes],
    }


@click.command("bench")
@click.option(
    "--calls",
    type=click.IntRange(min=100),
    default=20_000,
    show_default=True,
    help="log_metrics calls per timing round.",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=7,
    show_default=True,
    help="Timing rounds; the best is kept.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Runs in the flush workload.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Steps per run (two metrics each) in the flush workload.",
)
@click.option(
    "--max-workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="max_workers of the runactors clients.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench(calls: int, repeat: int, runs: int, steps: int, max_workers: int, as_json: bool) -> None:
    """Benchmark this client against MLflow's own queueing client, side by side."""
    hot = hot_path(calls, repeat)
    flushes = [
        throughput(name, make, runs, steps) for name, make in contenders(max_workers).items()
    ]
    if as_json:
        click.echo(json.dumps(to_dict(hot, flushes), indent=2))
        return
    click.echo(f"machine: {machine()}")
    click.echo("hot path: log_metrics with two metrics, per call (best of rounds)")
    click.echo(f"  mlflow seed client  {hot.seed_us:8.2f} us")
    click.echo(f"  runactors           {hot.runactors_us:8.2f} us   ({hot.ratio:.2f}x the seed)")
    click.echo(f"flush: {runs} runs x {steps} steps x 2 metrics into a fresh SQLite store")
    for t in flushes:
        click.echo(f"  {t.contender:<20}{t.seconds:8.2f} s  {t.points_per_second:10,.0f} points/s")
