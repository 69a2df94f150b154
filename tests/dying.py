"""A training process that dies: a child logging two runs under load until it is signalled
(or raises, or exits), and what the store holds afterwards.

The child prints every step it has logged on both runs, so the parent knows exactly what was
logged before the death (and when) and counts it against the store. Used by
``tests/test_dying.py``, and by ``tests/crash_table.py``, which measures the table of each
ending (what was lost, what runs were left) for this checkout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
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
if os.environ.get("DYING_SPOOL"):  # the write-ahead journal, and the keeper
    options["spool_dir"] = os.environ["DYING_SPOOL"]
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
        print(step, time.time(), flush=True)  # logged on both runs
        if step == end_at:
            if how == "os._exit":
                os._exit(3)
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
    missing: list[int] = field(default_factory=list)  # the steps ``lost`` counts


@dataclass
class Death:
    returncode: int
    last_step: int  # the last step the child printed (logged on both runs), -1: none
    stdout: str
    stderr: str
    runs: list[StoredRun] = field(default_factory=list)
    logged_at: dict[int, float] = field(default_factory=dict)  # step: when it was logged
    died_at: float = 0.0  # the signal sent, or the last step logged (time.time())
    ended_after: float | None = None  # seconds from the death to no run RUNNING

    @property
    def lost(self) -> int:
        return sum(run.lost for run in self.runs)

    @property
    def running(self) -> int:
        return sum(run.status == "RUNNING" for run in self.runs)


def _logged(line: str) -> tuple[int, float] | None:
    """A line the child printed after logging a step: the step and when."""
    fields = line.split()
    if len(fields) != 2 or not fields[0].isdigit() or not line.endswith("\n"):
        return None
    return int(fields[0]), float(fields[1])


def _steps(line: str) -> int | None:
    logged = _logged(line)
    return None if logged is None else logged[0]


def _default_dispositions() -> None:
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


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
    wait_ended: float = 0.0,
    **env: str,
) -> Death:
    """Start the child, let it log ``after_steps`` steps (or ``after_seconds``), send it
    ``signum`` (none: it ends by itself at that step, as ``how`` says: ``raise``,
    ``exit-N``, ``os._exit``), wait for it and read back its runs (once none is RUNNING,
    for up to ``wait_ended`` seconds after the death: a keeper ends them)."""
    if signum is None:
        env.setdefault("DYING_END_AT", str(after_steps))
    errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, uri, experiment_id, executor, how, str(flush_interval)],
        env=script_env(PYTHONFAULTHANDLER="1", **env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=errors,  # a file: a keeper the child started may hold it open
        text=True,
        # Started as from a terminal, whatever this process's dispositions: under `nohup`
        # (SIGHUP ignored, and inherited) the child would ignore the SIGHUP it is sent.
        preexec_fn=_default_dispositions,
    )
    out: list[str] = []
    died_at = 0.0
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
            died_at = time.time()
            child.send_signal(signum)
        try:
            rest, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # hung: its threads' stacks say where
            child.send_signal(signal.SIGABRT)
            child.communicate()
            errors.seek(0)
            raise AssertionError(
                f"the child did not end within {timeout} s:\n{errors.read()}"
            ) from None
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        errors.seek(0)
        stderr = errors.read()
        errors.close()
    stdout = "".join(out) + rest
    logged = dict(filter(None, map(_logged, stdout.splitlines(keepends=True))))
    death = Death(child.returncode, max(logged, default=-1), stdout, stderr, logged_at=logged)
    death.died_at = died_at or max(logged.values(), default=time.time())
    store = MlflowClient(uri)
    while wait_ended:  # until no run is RUNNING, or the wait is over
        statuses = [run.info.status for run in store.search_runs([experiment_id])]
        if statuses and "RUNNING" not in statuses:
            death.ended_after = time.time() - death.died_at
            break
        if time.time() > death.died_at + wait_ended:
            break
        time.sleep(0.05)
    for run in store.search_runs([experiment_id]):
        history = store.get_metric_history(run.info.run_id, "loss")
        steps = {metric.step for metric in history}
        missing = [step for step in range(death.last_step + 1) if step not in steps]
        death.runs.append(
            StoredRun(
                name=run.info.run_name,
                status=run.info.status,
                end_time=run.info.end_time,
                points=len(history),
                lost=len(missing),
                duplicates=len(history) - len(steps),
                missing=missing,
            )
        )
    death.runs.sort(key=lambda run: run.name)
    return death
