"""The table of issue 16, measured: how each way of dying leaves a training process's runs.

    python tests/crash_table.py [--executor thread|process] [--seed N]

For each ending, a real child (``tests/dying.py``'s) logs 2 runs under load (a step about
every millisecond on both runs) into a real SQLite store in a temp folder and dies at a
random moment; every point it reported logged before its death is counted against the store
(after waiting, up to 10 s, for the runs to end: the keeper's work after SIGKILL and
``os._exit``). One row per ending: points reported, points lost (and, with ``spool_dir``,
those logged more than ``journal_interval`` before the death), points stored twice, the
runs' statuses, whether their end time is set, the exit status, and the time from the death
to every run ended. A measurement, run by hand; the tests are ``tests/test_dying.py``,
``tests/test_journal.py`` and ``tests/test_keeper.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script
from dying import Death, die

JOURNAL_INTERVAL = 0.2  # the client's default
WAIT_ENDED = 10.0  # the contract's goal for the keeper


@dataclass(frozen=True)
class Ending:
    label: str
    how: str  # the child's way of running (tests/dying.py)
    signum: int | None  # None: the child ends itself at a random step
    flush_interval: float
    spool: bool = False  # with spool_dir: the journal and the keeper


ENDINGS = [
    Ending("SIGTERM 2 s in (`flush_interval=5`)", "run", signal.SIGTERM, 5.0),
    Ending("SIGTERM (`flush_interval=0.2`)", "run", signal.SIGTERM, 0.2),
    Ending("SIGINT / KeyboardInterrupt", "run", signal.SIGINT, 0.2),
    Ending("SIGHUP", "run", signal.SIGHUP, 0.2),
    Ending("uncaught exception", "raise", None, 0.2),
    Ending("SIGKILL with `spool_dir` (`flush_interval=5`)", "run", signal.SIGKILL, 5.0, True),
    Ending("`os._exit` with `spool_dir`", "os._exit", None, 0.2, True),
]


def _due_lost(death: Death) -> int:
    """Points lost that were logged more than ``journal_interval`` before the death."""
    due = death.died_at - JOURNAL_INTERVAL
    return sum(death.logged_at.get(step, due) < due for run in death.runs for step in run.missing)


def _row(ending: Ending, executor: str, death: Death, spool: Path) -> str:
    reported = 2 * (death.last_step + 1)
    names = [run.name for run in death.runs]
    twice = sum(run.duplicates for run in death.runs) + len(names) - len(set(names))
    lost = f"{death.lost:,}"
    if ending.spool:
        lost += f" ({_due_lost(death)} logged > {JOURNAL_INTERVAL} s before)"
        left = [p.name for p in spool.rglob("*") if p.is_file()]
        if left:
            lost += f"; journal left: {', '.join(left)}"
    statuses = ", ".join(run.status for run in death.runs) or "none in the store"
    ends = [bool(run.end_time) for run in death.runs]
    end_time = "yes" if ends and all(ends) else ("no" if not any(ends) else "some")
    code = death.returncode
    exit_status = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
    ended = "never" if death.ended_after is None else f"{death.ended_after:.1f} s"
    cells = [ending.label, executor, f"{reported:,}", lost, str(twice), statuses, end_time]
    return "| " + " | ".join([*cells, exit_status, ended]) + " |"


def measure(ending: Ending, executor: str, rng: random.Random) -> str:
    """Run one ending in a fresh temp folder; its table row."""
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        experiment_id = MlflowClient(uri).create_experiment("dying")
        spool = Path(folder) / "spool"
        env = {"DYING_SPOOL": str(spool)} if ending.spool else {}
        seconds = 2.0 if ending.flush_interval == 5.0 and not ending.spool else None
        death = die(
            uri,
            experiment_id,
            executor,
            ending.how,
            signum=ending.signum,
            after_steps=rng.randint(300, 2500),
            after_seconds=seconds if seconds else rng.uniform(0.5, 3.0),
            flush_interval=ending.flush_interval,
            wait_ended=WAIT_ENDED,
            **env,
        )
        return _row(ending, executor, death, spool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices=["thread", "process"], action="append")
    parser.add_argument("--seed", type=int, default=None, help="the random moments' seed")
    args = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its lines about new stores
    rng = random.Random(args.seed)
    print(
        "| ending | executor | points reported | lost | stored twice | runs | end time "
        "| exit | death to runs ended |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for executor in args.executor or ["thread", "process"]:
        for ending in ENDINGS:
            print(measure(ending, executor, rng), flush=True)


if __name__ == "__main__":
    main()
