"""``ParamMemory``: every param a client queued for one run, flushed or not, whatever name
the run was addressed by.

A run created by ``create_run`` has two names in its client once it exists: its
``PendingRunId`` and its run ID string, each with queues of its own. MLflow refuses a param
whose value changes, so both names must check against one memory: the queues of each name
hold the same ``ParamMemory`` (the session hands the ID string's queues the memory of the
pending run that learned that ID, :meth:`~actors.runtime._session.Session.params_of`).
Its own lock makes a check and its record one step, whichever queues' lock the caller holds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

Pair = tuple[str, str]


def _quoted(value: str, limit: int = 100) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def param_changed(key: str, old: str, new: str) -> MlflowException:
    """What logging ``key`` again with another value raises."""
    return MlflowException(
        f"Invalid param {key!r}: this client already queued or logged the value {_quoted(old)} "
        f"for this run, and MLflow does not allow changing a param's value (got "
        f"{_quoted(new)}). Nothing of this call was queued.",
        INVALID_PARAMETER_VALUE,
    )


class ParamMemory:
    """Key -> value (as MLflow stores it) of every param queued for one run."""

    __slots__ = ("_lock", "_values")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, str] = {}

    def _new(self, pairs: list[Pair]) -> list[Pair]:
        new: list[Pair] = []
        for key, value in pairs:
            old = self._values.get(key)
            if old is None:
                new.append((key, value))
            elif old != value:
                raise param_changed(key, old, value)
        return new

    def new_params(self, pairs: list[Pair]) -> list[Pair]:
        """The pairs whose key has no value yet, remembering nothing; raises
        ``param_changed`` if one has another value already."""
        with self._lock:
            return self._new(pairs)

    def admit(self, pairs: list[Pair]) -> list[Pair]:
        """:meth:`new_params`, remembered in the same step (the caller appends them)."""
        with self._lock:
            new = self._new(pairs)
            self._values.update(new)
            return new

    def forget(self, keys: Iterable[str]) -> None:
        """Params that will never be sent: free to be logged again, with any value."""
        with self._lock:
            for key in keys:
                self._values.pop(key, None)

    def join(self, other: ParamMemory) -> None:
        """Copy this memory into ``other`` (which keeps its own value where both have one):
        the caller then uses ``other`` for the same run."""
        with self._lock:
            values = dict(self._values)
        with other._lock:
            for key, value in values.items():
                other._values.setdefault(key, value)

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._values.get(key)
