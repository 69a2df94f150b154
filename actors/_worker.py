"""The worker process of the process executor: ``python -m actors._worker FD``.

A fresh interpreter (never a fork, and not ``multiprocessing``'s spawn, which would re-import
the user's ``__main__``) that reads cloudpickled :class:`~actors._perform.Job`\\ s from a
socket, performs them with one ``MlflowClient`` per tracking URI
(:func:`actors._store.make_client`: MLflow's HTTP retries off), and reports each call's
outcome as it goes, so that the pool thread feeding it can resume the job elsewhere if this
process dies. It exits when the socket closes: a parent that dies takes its workers with it
(a child the parent forks closes its copies of the sockets, see ``actors._process_executor``).
A job it cannot unpickle is refused (the parent fails its calls); this process goes on.
"""

from __future__ import annotations

import socket
import sys
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from actors._executor import failed_result
from actors._perform import Job, perform_job, retry_error_text
from actors._plan import Call


def _client(clients: dict[str, Any], uri: str) -> Any:
    """This worker's ``MlflowClient`` for ``uri``, made on first use."""
    client = clients.get(uri)
    if client is None:
        from actors._store import make_client

        client = clients[uri] = make_client(uri)
    return client


def serve(conn: Connection) -> None:
    clients: dict[str, Any] = {}
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            job: Job = cloudpickle.loads(payload)
        except Exception as exc:  # a class the parent has and this interpreter cannot import
            conn.send(("refused", repr(exc)))
            continue

        def on_retry(exc: BaseException, delay: float) -> None:
            conn.send(("state", "retrying", retry_error_text(exc)))

        def on_retry_end() -> None:
            conn.send(("state", "flushing"))

        def on_call(call: Call, error: str | None, run_id: str | None) -> None:
            conn.send(("call", error, run_id))

        conn.send(("state", "flushing"))
        try:
            open_client = partial(_client, clients, job.tracking_uri)
            result = perform_job(open_client, job, on_retry, on_call, on_retry_end)
        except BaseException as exc:  # a bad URI, a broken store: this job fails, we go on
            result = failed_result(job, exc)
        conn.send_bytes(cloudpickle.dumps(result))


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    serve(Connection(sock.detach()))


if __name__ == "__main__":
    main()
