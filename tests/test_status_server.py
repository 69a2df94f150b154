"""The status endpoint, its Prometheus metrics and ``runactors status``, against real parts.

A real HTTP client (urllib) talks to a real server while a flush is held by a real lock on
the store (``lock_store``), on both executors; ``/metrics`` is parsed with
``prometheus_client``'s own parser and its counters checked against the rows in the SQLite
store; ``RUNACTORS_STATUS_PORT`` is tried on an unmodified service run as a subprocess; the
command is run against a live server, a dead URL, and (``--watch``) stopped with SIGINT.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_ALREADY_EXISTS,
    ErrorCode,
)
from prometheus_client.parser import text_string_to_metric_families
from scripts import REPO, script_env
from stores import SqliteLock

from client import QueueingClient, StatusServer
from client._cli import main

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
WAIT = 120.0  # seconds: generous bounds for a loaded machine, never a timing assertion


def get(url: str, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def get_status(server_url: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(get(server_url + "/status"))
    return document


def scrape(server_url: str) -> tuple[Samples, dict[str, str]]:
    """Every sample of ``/metrics`` by (name, labels), and each family's type."""
    text = get(server_url + "/metrics").decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def db_rows(tracking_uri: str, table: str) -> int:
    with sqlite3.connect(tracking_uri.removeprefix("sqlite:///")) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def poll(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """``check()``'s first truthy answer; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def client_factory(tracking_uri: str) -> Iterator[Callable[..., QueueingClient]]:
    made: list[QueueingClient] = []

    def make(**kwargs: Any) -> QueueingClient:
        made.append(QueueingClient(tracking_uri, **kwargs))
        return made[-1]

    yield make
    for client in made:
        try:
            client.close(timeout=30)
        except MlflowException:
            pass


@pytest.fixture
def serve() -> Iterator[Callable[[QueueingClient], StatusServer]]:
    made: list[StatusServer] = []

    def start(client: QueueingClient) -> StatusServer:
        made.append(client.serve_status())
        return made[-1]

    yield start
    for server in made:
        server.close()


def test_status_and_metrics_answer_while_a_flush_is_held(
    executor: str,
    experiment_id: str,
    client_factory: Callable[..., QueueingClient],
    serve: Callable[[QueueingClient], StatusServer],
    lock_store: Callable[..., SqliteLock],
) -> None:
    """A request never waits on a flush: the store is locked, the run's job is stuck in
    its call, and both endpoints answer, showing which worker (a process: its pid) has it."""
    client = client_factory(executor=executor)
    run = client.create_run(experiment_id, run_name="held")
    client.log_metrics(run, {"loss": 1.0}, step=0)
    client.flush()  # the run exists; the executor (and a worker process) has started
    client_id = client.status().client_id
    server = serve(client)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url)
    for step in range(1, 200):
        client.log_metrics(run, {"loss": 1.0 / step}, step=step)
    with lock_store():
        operations = client.flush(synchronous=False)

        def busy_run() -> dict[str, Any] | None:
            document = get_status(server.url)
            assert document["pid"] == os.getpid()
            mine = [c for c in document["clients"] if c["client_id"] == client_id]
            assert len(mine) == 1
            (run_status,) = mine[0]["runs"]
            if run_status["state"] in ("flushing", "retrying") and run_status["worker"]:
                return dict(run_status)
            return None

        run_status = poll(busy_run, "the run's job shows as in flight, with its worker")
        assert run_status["queued"]["metrics"] == 199
        assert not operations.done()  # the flush really is held by the lock
        samples, _ = scrape(server.url)
        busy = sum(value(samples, "runactors_runs", state=s) for s in ("flushing", "retrying"))
        assert busy >= 1
        assert value(samples, "runactors_queued_entities", kind="metrics") >= 199
        worker = run_status["worker"]
        table = CliRunner().invoke(main, ["status", server.url], env={"COLUMNS": "200"})
        assert table.exit_code == 0, table.output
        assert f"│ {worker} " in table.output  # as served: "[pid N]" is no rich markup
        if executor == "process":
            match = re.search(r"pid (\d+)", worker)
            assert match, worker
            pid = int(match.group(1))
            assert pid != os.getpid()
            os.kill(pid, 0)  # a live process of ours: raises if there is none
    operations.await_completion(timeout=WAIT)
    (mine,) = [c for c in get_status(server.url)["clients"] if c["client_id"] == client_id]
    (run_status,) = mine["runs"]  # (other tests' clients may not be collected yet)
    assert run_status["logged"]["metrics"] == 200
    assert run_status["worker"] is None  # nobody works on it any more


def test_metrics_counters_match_the_store_and_never_go_down(
    executor: str,
    tracking_uri: str,
    experiment_id: str,
    client_factory: Callable[..., QueueingClient],
    serve: Callable[[QueueingClient], StatusServer],
) -> None:
    """The counters are what reached the store (deltas: they count the whole process);
    after the client closes they stay, while its runs leave the gauges and ``/status``."""
    client = client_factory(executor=executor)
    server = serve(client)
    before, types = scrape(server.url)
    assert types == {
        "runactors_runs": "gauge",
        "runactors_queued_entities": "gauge",
        "runactors_spooled_entities": "gauge",
        "runactors_logged_entities": "counter",
        "runactors_failed_operations": "counter",
        "runactors_retries": "counter",
        "runactors_flush_seconds": "histogram",
    }
    metric_rows, param_rows = db_rows(tracking_uri, "metrics"), db_rows(tracking_uri, "params")
    runs = [client.create_run(experiment_id, run_name=f"r{i}") for i in range(2)]
    for i, run in enumerate(runs):
        client.log_params(run, {"lr": 0.1 * (i + 1), "layers": 3})
        for step in range(150):
            client.log_metrics(run, {"loss": 1 / (step + 1), "acc": step / 150}, step=step)
        client.set_terminated(run, "FINISHED")
    client.log_metrics("0" * 32, {"x": 1.0, "y": 2.0})  # no such run: one failed batch
    with pytest.raises(MlflowException, match=r"0{32}"):
        client.flush()
    after, _ = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("runactors_logged_entities_total", kind="metrics") == 600
    assert db_rows(tracking_uri, "metrics") - metric_rows == 600
    assert delta("runactors_logged_entities_total", kind="params") == 4
    assert db_rows(tracking_uri, "params") - param_rows == 4
    assert delta("runactors_failed_operations_total") == 1
    assert delta("runactors_flush_seconds_count") == 3  # one round per run
    assert delta("runactors_flush_seconds_sum") > 0
    assert value(after, "runactors_flush_seconds_bucket", le="+Inf") == value(
        after, "runactors_flush_seconds_count"
    )
    assert value(after, "runactors_runs", state="idle") >= 1  # the failed run
    assert value(after, "runactors_runs", state="stopped") >= 2
    assert value(after, "runactors_queued_entities", kind="metrics") == 0

    with pytest.raises(MlflowException):  # its last flush fails the new batch: close() raises
        client.log_metrics("0" * 32, {"x": 3.0})
        client.close(timeout=WAIT)
    closed, _ = scrape(server.url)
    for name, labels in after:
        if name.endswith(("_total", "_count", "_sum", "_bucket")):
            assert closed[(name, labels)] >= after[(name, labels)], name
    assert (
        value(closed, "runactors_failed_operations_total")
        == value(after, "runactors_failed_operations_total") + 1
    )
    client_id = client.status().client_id
    assert all(c["client_id"] != client_id for c in get_status(server.url)["clients"])


def test_bad_addresses_are_clear_errors(
    client_factory: Callable[..., QueueingClient],
) -> None:
    client = client_factory()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MlflowException, match=f"127.0.0.1:{port}.*in use") as info:
            client.serve_status(port=port)
        assert info.value.error_code == ErrorCode.Name(RESOURCE_ALREADY_EXISTS)
    for host, port in (("", 0), ("127.0.0.1", -1), ("127.0.0.1", 70000), ("127.0.0.1", "80")):
        with pytest.raises(MlflowException, match="Invalid") as info:
            client.serve_status(host=host, port=port)  # type: ignore[arg-type]
        assert info.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
    client.close()
    with pytest.raises(MlflowException) as info:
        client.serve_status()
    assert info.value.error_code == ErrorCode.Name(INVALID_STATE)


def test_close_stops_serving(client_factory: Callable[..., QueueingClient]) -> None:
    client = client_factory()
    with client.serve_status() as server:
        assert get(server.url + "/status")
        with pytest.raises(urllib.error.HTTPError) as info:
            get(server.url + "/nothing")
        assert info.value.code == 404
    assert server.closed
    with pytest.raises(urllib.error.URLError):
        get(server.url + "/status", timeout=10)
    server.close()  # again: nothing


SERVICE = """
    import sys
    from client import QueueingClient

    client = QueueingClient()  # nothing about status here: the environment asks for it
    run = client.create_run(sys.argv[1], run_name="service")
    for step in range(30):
        client.log_metrics(run, {"loss": 1 / (step + 1)}, step=step)
    client.flush()
    print("logged", run.resolve(), flush=True)
    sys.stdin.read()  # until the test closes our stdin
    client.close()
"""


def start_service(experiment_id: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SERVICE), experiment_id],
        env=script_env(**env),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_service(service: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        out, err = service.communicate("", timeout=WAIT)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    assert service.returncode == 0, err
    return out, err


@pytest.mark.slow
def test_environment_variable_starts_it_in_an_unmodified_service(experiment_id: str) -> None:
    port = free_port()
    service = start_service(experiment_id, RUNACTORS_STATUS_PORT=str(port))
    url = f"http://127.0.0.1:{port}"
    try:

        def logged() -> dict[str, Any] | None:
            try:
                document = get_status(url)
            except (urllib.error.URLError, ConnectionError):
                return None
            runs = [run for client in document["clients"] for run in client["runs"]]
            return document if runs and runs[0]["logged"]["metrics"] == 30 else None

        document = poll(logged, "the service's status, with its 30 metrics, at the port")
        assert document["pid"] == service.pid
        samples, _ = scrape(url)
        assert value(samples, "runactors_logged_entities_total", kind="metrics") == 30
        assert value(samples, "runactors_runs", state="idle") == 1
    finally:
        out, _ = stop_service(service)
    assert out.startswith("logged ")


@pytest.mark.slow
def test_environment_variable_with_a_port_in_use_warns_and_the_service_goes_on(
    experiment_id: str,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = start_service(experiment_id, RUNACTORS_STATUS_PORT=str(port))
        out, err = stop_service(service)
    assert out.startswith("logged ")
    assert f"RUNACTORS_STATUS_PORT: Cannot serve the runactors status on 127.0.0.1:{port}" in err
    assert "already in use" in err


def test_status_command_prints_every_run(
    experiment_id: str,
    client_factory: Callable[..., QueueingClient],
    serve: Callable[[QueueingClient], StatusServer],
) -> None:
    client = client_factory()
    other = client_factory()
    runs = [client.create_run(experiment_id, run_name=f"t{i}") for i in range(2)]
    for run in runs:
        for step in range(20):
            client.log_metrics(run, {"loss": 1 / (step + 1)}, step=step)
    client.flush()
    dead = other.create_run(experiment_id, run_name="never")  # queued, not flushed
    server = serve(client)
    result = CliRunner().invoke(main, ["status", server.url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {
        cells[1]: cells
        for line in result.output.splitlines()
        if (cells := [c.strip() for c in line.strip("│ ").split("│")]) and len(cells) == 9
    }
    for run in runs:
        row = rows[run.resolve()]
        client_id = str(client.status().client_id)
        assert row[0] == client_id
        assert row[2:9] == ["idle", "0", "20", "0", "0", "0", "-"], row
    assert rows[str(dead)][2:4] == ["idle", "0"]  # its creation is queued (tags: none)
    assert "client(s)" in result.output and f"pid {os.getpid()}" in result.output

    as_json = CliRunner().invoke(main, ["status", server.url + "/status", "--json"])
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.output)
    ids = {run["run_id"] for c in document["clients"] for run in c["runs"]}
    assert {run.resolve() for run in runs} <= ids


def test_status_command_against_a_dead_url_is_one_line_and_status_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["status", url])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: nothing answers at {url}/status")


WATCH = ("--watch", "--interval", "0.2")


@pytest.mark.slow
def test_status_watch_refreshes_and_ctrl_c_ends_it_with_0(
    experiment_id: str,
    client_factory: Callable[..., QueueingClient],
    serve: Callable[[QueueingClient], StatusServer],
) -> None:
    client = client_factory()
    run = client.create_run(experiment_id, run_name="watched")
    client.flush()
    run_id = run.resolve()
    server = serve(client)
    # A child inherits an ignored SIGINT (this test run started in the background, say) and
    # Python then never raises KeyboardInterrupt: give it Ctrl-C as a terminal's child has it.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watch = subprocess.Popen(
            [sys.executable, "-m", "client._cli", "status", server.url, *WATCH],
            env=script_env(COLUMNS="200"),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert watch.stdout is not None
        seen = 0
        deadline = time.monotonic() + WAIT
        while seen < 3 and time.monotonic() < deadline:  # a table per refresh (no terminal)
            line = watch.stdout.readline()
            if not line:
                break
            seen += run_id in line
        assert seen >= 3, "the table was not printed again"
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=WAIT)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    assert "Traceback" not in err


def test_a_forked_child_leaves_the_port_to_its_parent(
    client_factory: Callable[..., QueueingClient],
) -> None:
    """A child forked while a server listens closes its copy of the socket at once: the
    parent's close() frees the port, however long the child lives."""
    client = client_factory()
    server = client.serve_status()
    port = server.port
    read, write = os.pipe()
    up_read, up_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold whatever it inherited until the parent is done
        os.close(write)
        os.write(up_write, b"u")  # its at-fork hooks have run (they run before fork returns)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    os.close(up_write)
    try:
        assert os.read(up_read, 1) == b"u"  # the child runs, as a long-lived child would
        os.close(up_read)
        server.close()
        with socket.socket() as again:
            again.bind(("127.0.0.1", port))  # EADDRINUSE if the child still listened on it
    finally:
        os.close(write)
        os.waitpid(pid, 0)
