"""The worker process of the process executor, forked by the worker template.

A fork of :mod:`actors.executors._template` (a fresh interpreter that has imported MLflow:
never a fork of
the user's process, and not ``multiprocessing``'s spawn, which would re-import the user's
``__main__``). It first sends the parent its PID and a pidfd of itself (so
that the parent can kill and wait for it without being its parent, and never signals a reused
PID), takes the parent's environment and working directory as they are now, then reads
cloudpickled :class:`~actors.delivery._perform.Job`\\ s from the socket, performs them with one
``MlflowClient`` per tracking URI (:func:`actors.delivery._store.make_client`: MLflow's HTTP retries
off), and reports each call's outcome as it goes, so that the pool thread feeding it can resume
the job elsewhere if this process dies. It exits when the socket closes: a parent that dies
takes its workers with it (a child the parent forks closes its copies of the sockets, see
``actors.executors._process_executor``).
A job it cannot unpickle is refused (the parent fails its calls); this process goes on.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from actors.delivery._fast_runs import perform_group
from actors.delivery._jobs import Job, retry_error_text
from actors.delivery._perform import perform_job
from actors.executors._executor import failed_result
from actors.queueing._plan import Call


def _client(clients: dict[str, Any], uri: str) -> Any:
    """This worker's ``MlflowClient`` for ``uri``, made on first use."""
    client = clients.get(uri)
    if client is None:
        from actors.delivery._store import make_client

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
            job: Job | tuple[str, list[Job]] = cloudpickle.loads(payload)
        except Exception as exc:  # a class the parent has and this interpreter cannot import
            conn.send(("refused", repr(exc)))
            continue

        def on_retry(exc: BaseException, delay: float) -> None:
            conn.send(("state", "retrying", retry_error_text(exc)))

        def on_retry_end() -> None:
            conn.send(("state", "flushing"))

        if isinstance(job, tuple):  # ("group", jobs): whole runs in one transaction
            jobs = job[1]
            open_group = partial(_client, clients, jobs[0].tracking_uri)
            done = perform_group(open_group, jobs, on_retry, on_retry_end)
            conn.send_bytes(cloudpickle.dumps(("group", done)))
            continue

        def on_call(call: Call, error: str | None, run_id: str | None) -> None:
            conn.send(("call", error, run_id))

        conn.send(("state", "flushing"))
        try:
            open_client = partial(_client, clients, job.tracking_uri)
            result = perform_job(open_client, job, on_retry, on_call, on_retry_end)
        except BaseException as exc:  # a bad URI, a broken store: this job fails, we go on
            result = failed_result(job, exc)
        conn.send_bytes(cloudpickle.dumps(result))


HELLO = struct.Struct("=q")  # the worker's PID, sent with a pidfd of itself


def serve_forked(fd: int) -> None:
    """Run a forked worker on socket ``fd``: hello, the parent's setup, then jobs."""
    sock = socket.socket(fileno=fd)
    try:
        pidfd = os.pidfd_open(os.getpid())
        try:
            socket.send_fds(sock, [HELLO.pack(os.getpid())], [pidfd])
        finally:
            os.close(pidfd)
    except OSError:  # the parent is gone already
        sock.close()
        return
    conn = Connection(sock.detach())
    try:
        env, cwd = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return
    os.environ.clear()
    os.environ.update(env)
    try:
        os.chdir(cwd)
    except OSError:  # the parent's folder is gone: relative paths fail as they would there
        pass
    serve(conn)
