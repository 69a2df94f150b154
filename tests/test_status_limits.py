"""The status endpoint under a restart, a crowd, stalled connections and a slow ``close()``;
``runactors status`` with its output piped.

Real sockets against a real ``StatusServer``: a restart right after a scrape (the port in
TIME_WAIT), 200 concurrent requests (a dropped connection shows as a TCP retransmission on
its socket, counted, not timed), connections that send nothing, half a request, or a byte
at a time; a client closing against a store that refuses connections; the command run as
a subprocess with its stdout a pipe.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from scripts import REPO, script_env

from client import QueueingClient, StatusServer

WAIT = 120.0  # seconds: generous bounds for a loaded machine, never a timing assertion
WATCH = ("--interval", "0.2")
STATUS_REQUEST = b"GET /status HTTP/1.0\r\nHost: x\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def request(port: int, raw: bytes = STATUS_REQUEST) -> bytes:
    """One HTTP/1.0 exchange, read to the end: the server closes the connection first."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(raw)
        return read_to_eof(sock)


def status_of(port: int) -> dict[str, Any]:
    head, _, body = request(port).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    document: dict[str, Any] = json.loads(body)
    return document


@pytest.fixture
def client(tracking_uri: str) -> Iterator[QueueingClient]:
    client = QueueingClient(tracking_uri)
    yield client
    client.close(timeout=30)


# -- 11: a restarted service binds its port again at once -------------------------------


def test_the_port_binds_again_right_after_a_scrape(client: QueueingClient) -> None:
    """The server closes each connection first, so after a scrape its side sits in
    TIME_WAIT; a new server (a restarted service) must still bind the port at once."""
    server = StatusServer()
    port = server.port
    try:
        assert b'"clients"' in request(port)  # read to EOF: the server closed first
    finally:
        server.close()
    again = StatusServer(port=port)  # raised "already in use" while in TIME_WAIT
    try:
        assert status_of(port)["pid"] == os.getpid()
        with pytest.raises(MlflowException, match="already in use"):
            StatusServer(port=port)  # still never two servers on one port
    finally:
        again.close()


@pytest.mark.slow
def test_a_restarted_service_serves_on_its_port_again(
    experiment_id: str, client: QueueingClient
) -> None:
    """As a service does it: ``RUNACTORS_STATUS_PORT`` in a new process, right after the
    previous server of that port was scraped and closed."""
    server = StatusServer()
    port = server.port
    request(port)
    server.close()
    url = f"http://127.0.0.1:{port}/status"
    code = """
        import json, sys, urllib.request
        from client import QueueingClient
        client = QueueingClient(sys.argv[1])
        client.create_run(sys.argv[2])
        with urllib.request.urlopen(sys.argv[3], timeout=60) as response:
            print(json.loads(response.read())["pid"])
        client.close()
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), client.tracking_uri, experiment_id, url],
        env=script_env(RUNACTORS_STATUS_PORT=str(port)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr
    assert "already in use" not in result.stderr
    assert result.stdout.strip().isdigit()


# -- 12: many connections at once, and stalled ones ----------------------------------------


def retransmissions(sock: socket.socket) -> int:
    """TCP segments this socket sent again (``tcpi_total_retrans``): on loopback, only a
    connection the server's kernel dropped (a full listen queue) has any."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 100)[0])


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="TCP_INFO is Linux's")
def test_200_concurrent_requests_are_all_answered_none_dropped(
    experiment_id: str, client: QueueingClient
) -> None:
    """A listen queue of the stdlib's 5 overflows: the kernel drops connections, which come
    back after 1, 3, 7 s SYN (or data) retransmissions. Each request is counted: answered,
    and with no retransmission on its socket."""
    for i in range(3):
        client.create_run(experiment_id, run_name=f"r{i}")
    client.flush()
    n = 200
    answered: list[int] = []
    resent: list[int] = []
    failed: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(n)
    with StatusServer() as server:

        def one() -> None:
            try:
                start.wait(timeout=WAIT)
                with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
                    sock.sendall(STATUS_REQUEST)
                    answer = read_to_eof(sock)
                    with lock:
                        answered.append(answer.startswith(b"HTTP/1.0 200") and b"pid" in answer)
                        resent.append(retransmissions(sock))
            except BaseException as exc:
                with lock:
                    failed.append(exc)

        threads = [threading.Thread(target=one) for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 2)
        assert not failed, failed[:3]
        assert sum(answered) == n
        dropped = sum(1 for count in resent if count)
        assert dropped == 0, f"{dropped} of {n} connections were dropped and sent again"


def test_stalled_connections_are_cut_and_the_server_answers(
    client: QueueingClient,
) -> None:
    """Connections that send nothing, half a request, or a byte at a time (each within the
    idle limit) are closed by the server once their time is up, more of them than it has
    handler threads; meanwhile and after, a real request is answered."""
    limit = 0.5
    with StatusServer(timeout=limit) as server:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(70)]
        partial = socket.create_connection(("127.0.0.1", server.port))
        partial.sendall(b"GET /sta")
        trickle = socket.create_connection(("127.0.0.1", server.port))
        stalled = [*silent, partial, trickle]
        try:
            for sock in stalled:
                sock.settimeout(30.0)  # 60 times the limit: the server has cut it long before
            stop = threading.Event()

            def drip() -> None:
                for byte in b"GET /status HTTP/1.0\r\nX-Slow: " + b"y" * 10_000:
                    if stop.wait(limit / 5):
                        return
                    try:
                        trickle.send(bytes([byte]))
                    except OSError:
                        return

            dripping = threading.Thread(target=drip)
            dripping.start()
            try:
                assert status_of(server.port)["pid"] == os.getpid()
                for sock in stalled:
                    try:
                        rest = read_to_eof(sock)  # the server's close; no answer is owed
                    except ConnectionResetError:
                        rest = b""
                    assert b"200 OK" not in rest
            finally:
                stop.set()
                dripping.join()
            assert status_of(server.port)["pid"] == os.getpid()
        finally:
            for sock in stalled:
                sock.close()


def test_close_ends_open_connections_at_once(client: QueueingClient) -> None:
    """``close()`` ends a stalled connection (and so its handler thread) at once, neither
    waiting out its time limit nor leaving it open behind a closed server."""
    server = StatusServer(timeout=WAIT * 10)
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=30.0)
    try:
        stalled.sendall(b"GET /sta")
        assert status_of(server.port)["pid"] == os.getpid()  # the stalled one is accepted
        closer = threading.Thread(target=server.close)
        closer.start()
        closer.join(30.0)
        assert not closer.is_alive(), "close() waits on a stalled connection"
        assert read_to_eof(stalled) == b""
    finally:
        stalled.close()
        server.close()


def test_a_bad_connection_timeout_is_a_clear_error() -> None:
    for timeout in (0, -1.0, float("nan"), "5", True):
        with pytest.raises(MlflowException, match="Invalid timeout") as info:
            StatusServer(timeout=timeout)  # type: ignore[arg-type]
        assert info.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)


# -- 13: a closing client stays visible -------------------------------------------------


def test_a_closing_client_stays_on_the_endpoint_until_closed(
    executor: str, fail_fast_http: None, experiment_id: str
) -> None:
    """While ``close()`` retries against a store that refuses connections, ``/status``
    shows the client and its queued metrics; once ``close()`` returned, it is gone."""
    closing = QueueingClient(f"http://127.0.0.1:{free_port()}", executor=executor, retry_timeout=3)
    run = closing.create_run(experiment_id, run_name="never")
    for step in range(50):
        closing.log_metrics(run, {"loss": 1.0}, step=step)
    with closing.serve_status() as server:
        client_id = closing.status().client_id
        raised: list[BaseException] = []

        def close() -> None:
            try:
                closing.close(timeout=WAIT)
            except BaseException as exc:
                raised.append(exc)

        closer = threading.Thread(target=close)
        closer.start()
        seen: list[dict[str, Any]] = []
        try:
            while closer.is_alive():
                started = closing.status().closed  # close() has begun
                clients = status_of(server.port)["clients"]
                mine = [c for c in clients if c["client_id"] == client_id]
                if started and mine and closer.is_alive():
                    seen.append(mine[0])
                time.sleep(0.05)
        finally:
            closer.join(WAIT)
        assert not closer.is_alive()
        assert seen, "the closing client was not on /status while close() ran"
        assert any(r["queued"]["metrics"] == 50 for c in seen for r in c["runs"]), seen[-1]
        after = status_of(server.port)["clients"]
        assert all(c["client_id"] != client_id for c in after)


# -- 15: runactors status with its output piped -------------------------------------------


def run_status(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``runactors status`` as a subprocess, stdout and stderr pipes (no terminal), in a
    narrow default width as a pipe has it."""
    return subprocess.run(
        [sys.executable, "-m", "client._cli", "status", *args],
        env=script_env(**{"COLUMNS": "", "TERM": "dumb", **env}),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


@pytest.mark.slow
def test_piped_status_prints_whole_run_ids_and_headers(
    experiment_id: str, client: QueueingClient
) -> None:
    runs = [client.create_run(experiment_id, run_name=f"piped{i}") for i in range(3)]
    for run in runs:
        client.log_metrics(run, {"loss": 0.5}, step=0)
    client.flush()
    # A run whose error is longer than a terminal's note of it: piped, it is printed whole.
    failing = client.create_run("9" * 300)
    with pytest.raises(MlflowException):
        client.flush()
    (error,) = next(r for r in client.status().runs if r.pending_id == failing).errors
    assert len(error) > 2 * 160
    with client.serve_status() as server:
        result = run_status(server.url)
        as_json = run_status(server.url, "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for run in runs:
        mine = [line for line in lines if run.resolve() in line]  # | grep RUN_ID
        assert len(mine) == 1, result.stdout
        assert " idle " in mine[0] or "│ idle" in mine[0], mine[0]
    (header,) = [line for line in lines if " client " in line and " state " in line]
    for name in ("run", "state", "queued", "logged", "spooled", "errors", "retries", "worker"):
        assert f" {name} " in header, header
    assert any(" ".join(error.split()) in " ".join(line.split()) for line in lines), lines[-3:]
    assert result.stderr == ""
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stdout.count("\n") == 1, as_json.stdout  # one object, one line
    assert {run.resolve() for run in runs} <= {
        run["run_id"] for c in json.loads(as_json.stdout)["clients"] for run in c["runs"]
    }


@pytest.mark.slow
def test_piped_watch_json_against_a_refused_port_keeps_stdout_json(
    client: QueueingClient,
) -> None:
    """``--watch --json``: stdout is JSON lines only; a server that stops answering is one
    line on stderr per refresh, never split."""
    server = client.serve_status()
    url = server.url
    process = subprocess.Popen(
        [sys.executable, "-m", "client._cli", "status", url, "--watch", "--json", *WATCH],
        env=script_env(COLUMNS="", TERM="dumb"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[tuple[str, str]] = queue.Queue()

    def read(name: str, stream: IO[str]) -> None:
        for line in stream:
            lines.put((name, line))

    assert process.stdout is not None and process.stderr is not None
    readers = [
        threading.Thread(target=read, args=("out", process.stdout)),
        threading.Thread(target=read, args=("err", process.stderr)),
    ]
    for reader in readers:
        reader.start()
    errors: list[str] = []
    try:
        closed = False
        # Until a refresh finds the port refusing (one that raced the close may read a
        # connection ended without an answer first).
        while not any("refused" in line for line in errors):
            name, line = lines.get(timeout=WAIT)
            if name == "out":
                assert json.loads(line)["pid"] == os.getpid(), line  # one object per line
                if not closed:
                    server.close()  # from now on the port refuses connections
                    closed = True
            else:
                assert closed, line
                errors.append(line)
    finally:
        server.close()
        process.terminate()
        process.wait(WAIT)
        for reader in readers:
            reader.join(WAIT)
    for line in errors:  # one whole line per refresh
        assert f"nothing answers at {url}/status: " in line, line
