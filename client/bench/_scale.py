"""The scale scenario's measurement, run in a subprocess of its own (:func:`main`, with
``RUNS URI``) so that its peak RSS is its own, not the bench's.

It queues ``RUNS`` runs of one metric each on a thread-executor client, then measures how
long ``flush(synchronous=False)`` takes to return, the most threads the process had until the
flush completed (sampled every 5 ms, from ``/proc`` where there is one) and the peak RSS;
it prints them as one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _threads() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return threading.active_count()


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM`` where there is ``/proc``.

    Not ``ru_maxrss`` there: Linux keeps it across ``exec``, so a subprocess of the bench
    reported the bench's own peak at the fork (570 MB in a run whose client peaked at 273 MB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def measure(runs: int, uri: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from client import QueueingClient

    experiment_id = MlflowClient(uri).create_experiment("scale")
    client = QueueingClient(uri)
    pending = [client.create_run(experiment_id, run_name=f"scale-{i}") for i in range(runs)]
    for run in pending:
        client.log_metrics(run, {"loss": 0.5}, step=0)
        client.set_terminated(run)
    peak = _threads()
    start = time.perf_counter()
    operations = client.flush(synchronous=False)
    returned = time.perf_counter() - start
    while not operations.done():
        peak = max(peak, _threads())
        time.sleep(0.005)
    operations.await_completion()
    flushed = time.perf_counter() - start
    client.close()
    # The peak so far is the client's: read it before the check below, whose search_runs
    # loads every run as an entity and is not runactors' cost.
    rss_mb = _peak_rss_mb()
    stored = len(MlflowClient(uri).search_runs([experiment_id], max_results=runs + 1))
    if stored != runs:
        raise RuntimeError(f"{stored} of {runs} runs were stored")
    return {
        "runs": runs,
        "flush_return_ms": returned * 1000,
        "flush_seconds": flushed,
        "peak_threads": peak,
        "peak_rss_mb": rss_mb,
    }


def main() -> None:
    """``RUNS URI`` from the command line: print the figures as one line of JSON."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    print(json.dumps(measure(int(sys.argv[1]), sys.argv[2])))


if __name__ == "__main__":
    main()
