"""runactors' public API: the queueing client, its result types and the CLI.

``MlflowAutologgingQueueingClient`` is ``QueueingClient``: code written for MLflow's
``mlflow.utils.autologging_utils.MlflowAutologgingQueueingClient`` switches by one import;
``patch_mlflow_autologging()`` switches MLflow's own autologging flavors in one call.
"""

from actors import ClientStatus, PendingRunId, RunState, RunStatus
from client._autologging import AutologgingPatch, patch_mlflow_autologging
from client._client import MlflowAutologgingQueueingClient, QueueingClient
from client._operations import RunOperations
from client._status_server import StatusServer

__all__ = [
    "AutologgingPatch",
    "ClientStatus",
    "MlflowAutologgingQueueingClient",
    "PendingRunId",
    "QueueingClient",
    "RunOperations",
    "RunState",
    "RunStatus",
    "StatusServer",
    "patch_mlflow_autologging",
]
