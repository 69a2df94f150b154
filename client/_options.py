"""The checks of ``QueueingClient``'s constructor: each option checked where it is given, with
an ``MlflowException`` (``INVALID_PARAMETER_VALUE``) naming it, into one ``SessionConfig``."""

from __future__ import annotations

import math
import os
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from actors import SessionConfig, check_spool_dir
from client._tracking_uri import resolve_tracking_uri

EXECUTORS = ("thread", "process")


def invalid(message: str) -> MlflowException:
    return MlflowException(message, INVALID_PARAMETER_VALUE)


def _check_spool_dir(spool_dir: Any) -> str | None:
    """The spool folder as an absolute path (a pickled copy must write to the same one),
    made (0700) and proven writable now: a folder that cannot be used fails here, naming
    it, not at the first outage. The journal itself is created at the first spool write."""
    if spool_dir is None:
        return None
    if not isinstance(spool_dir, str | os.PathLike) or not os.fspath(spool_dir):
        raise invalid(f"Invalid spool_dir {spool_dir!r}: expected a folder path (str, PathLike).")
    path = os.path.abspath(os.fspath(spool_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise invalid(f"Invalid spool_dir {path!r}: it exists and is not a folder.")
    check_spool_dir(path)
    return path


def session_config(
    tracking_uri: str | None,
    executor: Any,
    max_workers: Any,
    flush_interval: Any,
    max_queued: Any,
    retry_timeout: Any,
    spool_dir: Any,
    journal_interval: Any = 0.2,
    end_runs: Any = True,
) -> SessionConfig:
    """The client's options, checked, as the configuration of its session."""
    if executor not in EXECUTORS:
        raise invalid(f"Invalid executor {executor!r}: expected one of {list(EXECUTORS)}.")
    if max_workers is not None and (
        isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
    ):
        raise invalid(f"Invalid max_workers {max_workers!r}: expected an integer >= 1.")
    if flush_interval is not None and (
        isinstance(flush_interval, bool)
        or not isinstance(flush_interval, int | float)
        or not 0 < flush_interval < math.inf
    ):
        raise invalid(
            f"Invalid flush_interval {flush_interval!r}: expected a number of seconds > 0, "
            "or None for no background flushes."
        )
    if max_queued is not None and (
        isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1
    ):
        raise invalid(
            f"Invalid max_queued {max_queued!r}: expected an integer >= 1 (entities held "
            "in memory), or None for no bound."
        )
    if not isinstance(retry_timeout, int | float) or not retry_timeout >= 0:
        raise invalid(f"Invalid retry_timeout {retry_timeout!r}: expected >= 0 seconds.")
    if not isinstance(end_runs, bool):
        raise invalid(f"Invalid end_runs {end_runs!r}: expected True or False.")
    if (
        isinstance(journal_interval, bool)
        or not isinstance(journal_interval, int | float)
        or not 0 <= journal_interval < math.inf
    ):
        raise invalid(
            f"Invalid journal_interval {journal_interval!r}: expected a number of seconds "
            ">= 0 (0: every logged call is on disk before it returns)."
        )
    return SessionConfig(
        # Checked and made absolute here: a pickled copy must reach the same store.
        tracking_uri=resolve_tracking_uri(tracking_uri),
        executor=executor,
        max_workers=max_workers,
        flush_interval=None if flush_interval is None else float(flush_interval),
        max_queued=max_queued,
        retry_timeout=float(retry_timeout),
        spool_dir=_check_spool_dir(spool_dir),
        journal_interval=float(journal_interval),
        end_runs=end_runs,
    )
