"""``PendingRunId``: the placeholder for a run that does not exist yet."""

from __future__ import annotations

from typing import Any

import pykka
from mlflow.exceptions import MlflowException


class PendingRunId:
    """A run that a client has queued for creation; usable wherever a ``run_id`` is.

    Only the client that returned it from ``create_run`` accepts it. Hashable by identity.

    >>> pending = client.create_run("0")              # doctest: +SKIP
    >>> client.flush(); pending.resolve()             # doctest: +SKIP
    '3f1c0e...'
    """

    __slots__ = ("__weakref__", "_future", "_label")

    def __init__(self) -> None:
        # A hand-made PendingRunId belongs to no client: every client rejects it.
        self._label = f"pending-unowned-{id(self):x}"
        self._future: pykka.ThreadingFuture[str] = pykka.ThreadingFuture()

    @classmethod
    def _issue(cls, label: str) -> PendingRunId:
        pending = cls()
        pending._label = label
        return pending

    def resolve(self, timeout: float | None = None) -> str:
        """Block until the run is created and return its ID.

        Args:
            timeout: seconds to wait at most; ``None``: as long as it takes.

        Returns:
            The run's ID in the tracking store.

        Raises:
            MlflowException: its creation failed (or was dropped).
            TimeoutError: ``timeout`` seconds passed first.
        """
        try:
            return str(self._future.get(timeout=timeout))
        except pykka.Timeout:
            waited = format_seconds(0.0 if timeout is None else timeout)
            raise TimeoutError(f"{self!r} was not created within {waited} s") from None

    def done(self) -> bool:
        """Whether creation has finished, successfully or not (never blocks).

        Returns:
            ``True`` once :meth:`resolve` would return or raise at once.
        """
        try:
            self._future.get(timeout=0)
        except pykka.Timeout:
            return False
        except Exception:
            return True
        return True

    def _set_created(self, run_id: str) -> None:
        try:
            self._future.set(run_id)
        except Exception:  # already settled (e.g. dropped): keep the first outcome
            pass

    def _set_failed(self, message: str) -> None:
        exc = MlflowException(f"Run {self._label} was not created: {message}")
        try:
            self._future.set_exception((MlflowException, exc, None))
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"PendingRunId({self._label!r})"

    def __str__(self) -> str:
        return self._label

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy in another process names the same run but belongs to no client there.
        return (_detached, (self._label,))


def format_seconds(seconds: float) -> str:
    """A duration for a message, without float noise: 2.0000001 -> "2", 29.987 -> "30",
    12.34 -> "12.3", 0.05 -> "0.05". Deadlines give such values; users read the messages."""
    if seconds < 1:
        return f"{seconds:.2g}"
    return f"{seconds:.1f}".removesuffix(".0")


def _detached(label: str) -> PendingRunId:
    pending = PendingRunId()
    pending._label = label
    return pending
