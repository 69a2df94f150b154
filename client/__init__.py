"""runactors' public API: the queueing client, its result types and the CLI.

``MlflowAutologgingQueueingClient`` is ``QueueingClient``: code written for MLflow's
``mlflow.utils.autologging_utils.MlflowAutologgingQueueingClient`` switches by one import.
"""

from actors import ClientStatus, PendingRunId, RunState, RunStatus
from client._client import MlflowAutologgingQueueingClient, QueueingClient
from client._operations import RunOperations
from client._status_server import StatusServer

__all__ = [
    "ClientStatus",
    "MlflowAutologgingQueueingClient",
    "PendingRunId",
    "QueueingClient",
    "RunOperations",
    "RunState",
    "RunStatus",
    "StatusServer",
]
