"""A training process that dies: a child logging two runs under load until it is signalled
(or raises, or exits), and what the store holds afterwards.

The child prints every step it has logged on both runs, so the parent knows exactly what was
logged before the death and counts it against the store. Used by ``tests/test_dying.py``;
``python tests/dying.py`` prints the table of issue 16 (each ending, what was lost, what
runs were left) for this checkout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script, too
from scripts import REPO, script_env

CHILD = r"""
import os, signal, sys, time
from client import QueueingClient

uri, experiment, executor, how, flush_interval = sys.argv[1:6]
stop = False
if how == "own-handler":  # the program's own SIGTERM handler, set before the client exists
    def own_handler(signum, frame):
        global stop
        stop = True
        os.write(1, b"own handler ran\n")  # not print(): reentrant inside a print
    signal.signal(signal.SIGTERM, own_handler)
options = {}
if os.environ.get("DYING_END_RUNS") == "0":
    options["end_runs"] = False
client = QueueingClient(
    uri, executor=executor, flush_interval=float(flush_interval), retry_timeout=5, **options
)
runs = [client.create_run(experiment, run_name=f"run-{i}") for i in range(2)]
for i, run in enumerate(runs):
    client.log_params(run, {"index": str(i)})
if os.environ.get("DYING_FLUSH_FIRST"):  # the runs exist before the death
    client.flush()
end_at = int(os.environ.get("DYING_END_AT", "-1"))
pause = float(os.environ.get("DYING_STEP_SECONDS", "0.001"))  # a training step


def train():
    global stop
    step = 0
    while not stop:
        for run in runs:
            client.log_metrics(run, {"loss": 1.0 / (step + 1)}, step=step)
        print(step, flush=True)  # logged on both runs
        if step == end_at:
            if how == "raise":
                raise RuntimeError(f"boom at step {step}")
            sys.exit(int(how.removeprefix("exit-")))
        step += 1
        time.sleep(pause)


def run():
    if os.environ.get("DYING_WITH"):  # left by the signal's exception: what is queued stays
        with client:
            train()
    else:
        train()
    print("clean end", flush=True)


if how == "service":  # the main thread ends; the work goes on in a (non-daemon) thread
    import threading

    threading.Thread(target=run).start()
else:
    run()
"""


@dataclass
class StoredRun:
    name: str
    status: str
    end_time: int | None
    points: int  # stored points of "loss"
    lost: int  # steps the child printed that the store lacks
    duplicates: int  # points stored twice


@dataclass
class Death:
    returncode: int
    last_step: int  # the last step the child printed (logged on both runs), -1: none
    stdout: str
    stderr: str
    runs: list[StoredRun] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return sum(run.lost for run in self.runs)

    @property
    def running(self) -> int:
        return sum(run.status == "RUNNING" for run in self.runs)


def _steps(line: str) -> int | None:
    return int(line) if line.strip().isdigit() else None


def die(
    uri: str,
    experiment_id: str,
    executor: str,
    how: str,
    *,
    signum: int | None = None,
    after_steps: int = 300,
    after_seconds: float | None = None,
    flush_interval: float = 0.2,
    timeout: float = 90,
    **env: str,
) -> Death:
    """Start the child, let it log ``after_steps`` steps (or ``after_seconds``), send it
    ``signum`` (none: it ends by itself at that step, as ``how`` says: ``raise``,
    ``exit-N``), wait for it and read back its runs."""
    if signum is None:
        env.setdefault("DYING_END_AT", str(after_steps))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, uri, experiment_id, executor, how, str(flush_interval)],
        env=script_env(PYTHONFAULTHANDLER="1", **env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    try:
        assert child.stdout is not None
        started = None
        while signum is not None:
            line = child.stdout.readline()
            if not line:
                break  # it died by itself: the assertions below say how
            out.append(line)
            step = _steps(line)
            if step is not None and started is None:
                started = time.monotonic()
            if after_seconds is not None:
                if started is not None and time.monotonic() - started >= after_seconds:
                    break
            elif step is not None and step >= after_steps:
                break
        if signum is not None:
            child.send_signal(signum)
        try:
            rest, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # hung: its threads' stacks say where
            child.send_signal(signal.SIGABRT)
            rest, stderr = child.communicate()
            raise AssertionError(f"the child did not end within {timeout} s:\n{stderr}") from None
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    stdout = "".join(out) + rest
    printed = [s for s in map(_steps, stdout.splitlines()) if s is not None]
    death = Death(child.returncode, printed[-1] if printed else -1, stdout, stderr)
    store = MlflowClient(uri)
    for run in store.search_runs([experiment_id]):
        history = store.get_metric_history(run.info.run_id, "loss")
        steps = {metric.step for metric in history}
        death.runs.append(
            StoredRun(
                name=run.info.run_name,
                status=run.info.status,
                end_time=run.info.end_time,
                points=len(history),
                lost=sum(step not in steps for step in range(death.last_step + 1)),
                duplicates=len(history) - len(steps),
            )
        )
    death.runs.sort(key=lambda run: run.name)
    return death


def describe(death: Death) -> str:
    """One table row's last two cells: what was lost, what runs were left."""
    logged = 2 * (death.last_step + 1)
    if not death.runs:
        return f"all {logged} points, and the runs: never created | none in the store"
    left = ", ".join(
        f"{run.status}{'' if run.end_time else ' (no end time)'}" for run in death.runs
    )
    return f"{death.lost} of {logged} points | {left} (exit {death.returncode})"


def main() -> None:  # pragma: no cover - a measurement, run by hand
    import tempfile

    rows = [
        ("SIGTERM 2 s in (flush_interval=5)", "term", signal.SIGTERM, 5.0, 2.0),
        ("SIGTERM (flush_interval=0.2)", "term", signal.SIGTERM, 0.2, 2.0),
        ("SIGINT / KeyboardInterrupt", "int", signal.SIGINT, 0.2, 2.0),
        ("SIGHUP", "hup", signal.SIGHUP, 0.2, 2.0),
        ("uncaught exception", "raise", None, 0.2, None),
    ]
    for executor in sys.argv[1:] or ["thread"]:
        for label, how, signum, interval, seconds in rows:
            with tempfile.TemporaryDirectory() as folder:
                uri = f"sqlite:///{folder}/mlflow.db"
                experiment = MlflowClient(uri).create_experiment("dying")
                death = die(
                    uri,
                    experiment,
                    executor,
                    how,
                    signum=signum,
                    after_seconds=seconds,
                    after_steps=2000,
                    flush_interval=interval,
                )
                print(f"| {label}, {executor} | {describe(death)} |", flush=True)


if __name__ == "__main__":
    main()
