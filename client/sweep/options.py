"""What ``runactors sweep`` was asked to do, and the constants its modules share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from mlflow.exceptions import MlflowException

DEFAULT_EXPERIMENT = "runactors-sweep"
DEFAULT_DB = "mlflow.db"
TRIAL_TAG = "runactors.trial"
SWEEP_TAG = "runactors.sweep"
SCORE = "val_accuracy"  # what "best trial" means

# With --log-every-batch: the mini-batch size, and so how many points an epoch logs.
BATCH_SIZE = 32

# After a Ctrl-C, how long the running trials get to stop at an epoch boundary (terminating
# their runs themselves, with their last metrics flushed) before their workers are killed.
STOP_GRACE_SECONDS = 10.0
# How long a worker process gets to exit once told to (its client flushes) before it is killed.
EXIT_SECONDS = 10.0
# How often a worker sends the parent its client's status while a trial runs.
SNAPSHOT_SECONDS = 0.3

Echo = Callable[[str], None]


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
    log_every_batch: bool = False  # also log per mini-batch (a visible load on demand)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as a single line of at most ``limit`` characters."""
    text = exc.message if isinstance(exc, MlflowException) else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
