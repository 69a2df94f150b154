"""``RunOperations``: the outcome of one ``flush()``, run by run."""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from actors import Ticket, ticket_done, wait_tickets


class RunOperations:
    """The operations one ``flush()`` sent, one future per run.

    ``await_completion()`` raises a single ``MlflowException`` naming every run that
    failed (``Failed to perform one or more operations on the run with ID ...``).
    """

    def __init__(self, tickets: list[Ticket]) -> None:
        self._tickets = tickets

    def await_completion(self, timeout: float | None = None) -> None:
        """Block until every operation of the flush is done; raise if any failed.

        Args:
            timeout: seconds to wait at most; ``None``: as long as it takes.

        Raises:
            MlflowException: one, naming every run whose operations failed.
            TimeoutError: ``timeout`` seconds passed first (nothing is cancelled).
        """
        failures = wait_tickets(self._tickets, timeout)
        if failures:
            raise MlflowException(
                "The following failures occurred while performing one or more logging"
                " operations: " + "\n".join(failures)
            )

    def done(self) -> bool:
        """Whether every operation of the flush has finished, successfully or not.

        Returns:
            ``True`` once no run of the flush is still in progress.
        """
        return all(ticket_done(ticket) for ticket in self._tickets)

    def __repr__(self) -> str:
        return f"RunOperations(runs={len(self._tickets)}, done={self.done()})"
