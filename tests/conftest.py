"""Shared fixtures: a real SQLite tracking store per test, thread accounting, and real faults
(a locked database, a hung server, a real ``mlflow server`` to stop, HTTP error statuses)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.tracking import MlflowClient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow database, made once and copied for each test."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(
    tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A fresh SQLite store in a temp folder, also made MLflow's default for the test."""
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def experiment_id(tracking_uri: str) -> str:
    return MlflowClient(tracking_uri).create_experiment("runactors-test")


@pytest.fixture
def store(tracking_uri: str) -> MlflowClient:
    """MLflow's own client on the test's store, to read back what was logged."""
    return MlflowClient(tracking_uri)


def run_data(store: MlflowClient, run_id: str) -> tuple[dict, dict, dict]:
    """Params, latest metrics and user tags (without ``mlflow.*``) of a run."""
    data = store.get_run(run_id).data
    tags = {k: v for k, v in data.tags.items() if not k.startswith("mlflow.")}
    return data.params, data.metrics, tags


def wait_for_threads(baseline: int, timeout: float = 30.0) -> int:
    """Wait until at most ``baseline`` threads remain (threads take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return threading.active_count()


def run_actor_threads() -> list[str]:
    """Names of the live threads of run actors (Pykka names them after the class)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("RunActor")]


def wait_for_no_run_actors(timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while run_actor_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return run_actor_threads()


@pytest.fixture(params=["thread", "process"])
def executor(request: pytest.FixtureRequest) -> str:
    """Behavioural tests run on both executors: they must store exactly the same."""
    return str(request.param)


# -- real faults ----------------------------------------------------------------------
#
# Faults injected by patching ``MlflowClient`` in the test process never reach a worker
# process of the process executor. The fixtures below make real ones instead: a database
# really locked by another connection, a server that really never answers, a real server
# really stopped, real HTTP error statuses on the wire. They reach both executors.

# One HTTP attempt per call (the client retries transient failures itself) and a short wait
# for an answer, so that a hung or broken server costs a test seconds, not MLflow's minutes.
FAIL_FAST_HTTP_TIMEOUT = 10


@pytest.fixture
def fail_fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own HTTP retries off and a short request timeout, for this test.

    Set in the environment, so worker processes started during the test inherit them.
    """
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(FAIL_FAST_HTTP_TIMEOUT))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoopbackServer:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers them.

    With ``reset=True`` it instead closes each accepted connection at once with a TCP reset
    (``SO_LINGER`` 0): a real "connection reset by peer" for the client.
    """

    def __init__(self, reset: bool = False) -> None:
        self.reset = reset
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)  # so that the accept loop sees close() promptly
        self.port = int(self._listener.getsockname()[1])
        self.uri = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="loopback-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for conn in self._held:
            conn.close()
        self._held.clear()


@pytest.fixture
def hung_server(fail_fast_http: None) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a server that accepts connections and never answers.

    MLflow's HTTP settings are those of ``fail_fast_http``: a request times out in
    ``FAIL_FAST_HTTP_TIMEOUT`` seconds.
    """
    server = LoopbackServer()
    try:
        yield server.uri
    finally:
        server.close()


class SqliteLock:
    """A second ``sqlite3`` connection holding ``BEGIN EXCLUSIVE`` on a database file.

    A real "database is locked" for every other connection, in this process or any other.
    Note that MLflow's SQL store waits up to 20 s for a lock (``PRAGMA busy_timeout =
    20000``) before it reports "database is locked", so a lock must be held longer than that
    to make a call fail; a shorter one only delays it. Entering takes the lock (waiting for
    other writers to finish first); it is released after ``hold`` seconds, by
    :meth:`release`, or on exit, whichever comes first.
    """

    def __init__(self, path: str | Path, hold: float) -> None:
        self.path = str(path)
        self.hold = hold
        self.released = threading.Event()
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def __enter__(self) -> SqliteLock:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        self._conn = conn
        self._timer = threading.Timer(self.hold, self.release)
        self._timer.daemon = True
        self._timer.start()
        return self

    def release(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.execute("ROLLBACK")
                self._conn.close()
                self._conn = None
                self.released.set()

    def __exit__(self, *exc_info: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.release()


@pytest.fixture
def lock_store(tracking_uri: str) -> Iterator[Callable[[float], SqliteLock]]:
    """``lock_store(hold)``: a :class:`SqliteLock` on the test's store, for ``with``.

    Every lock made is released at teardown, even if the test failed while holding it.
    """
    path = tracking_uri.removeprefix("sqlite:///")
    made: list[SqliteLock] = []

    def lock(hold: float) -> SqliteLock:
        made.append(SqliteLock(path, hold))
        return made[-1]

    yield lock
    for item in made:
        item.__exit__(None, None, None)


# -- a real ``mlflow server`` -----------------------------------------------------------

SERVER_START_TIMEOUT = 120.0


def http_healthy(uri: str) -> bool:
    """Whether an MLflow server answers ``GET /health`` with 200."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend, one uvicorn worker.

    :meth:`stop` and :meth:`start` may be called any number of times: the server comes back
    on the same port with the same store, as a restarted tracking server does.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db_path = root / "mlflow.db"
        self.log_path = root / "server.log"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.db_path}",
            "--default-artifact-root",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers ``/health``."""
        if self.running:
            return
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            # The server's job runner starts huey consumer processes: not needed here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
                start_new_session=True,  # its own group: stop() reaches its workers too
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not http_healthy(self.uri):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {self.process.returncode} before "
                    f"answering {self.uri}/health:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"mlflow server did not answer {self.uri}/health within "
                    f"{SERVER_START_TIMEOUT:.0f} s:\n{self._log_tail()}"
                )
            time.sleep(0.25)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server and every process of its group (SIGKILL by default: a crash)."""
        process, self.process = self.process, None
        if process is None:
            return
        for signum, wait in ((sig, 15.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the leader is gone; no worker of its group may outlive it
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def _mlflow_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop(signal.SIGTERM)


@pytest.fixture
def mlflow_server(_mlflow_server_process: MlflowServer, fail_fast_http: None) -> MlflowServer:
    """A real ``mlflow server`` shared by the session, running when the test starts.

    Startup takes seconds, so one server serves every test (each in its own experiment); a
    test may stop it and start it again (``MlflowServer.stop``/``start``), and the next test
    finds it running whatever this one left. MLflow's HTTP settings are ``fail_fast_http``.
    """
    _mlflow_server_process.start()
    return _mlflow_server_process


# -- HTTP error statuses on the wire ----------------------------------------------------


class FlakyProxy:
    """A reverse proxy on 127.0.0.1 in front of a tracking server that first answers some
    requests with error statuses: a real HTTP 408/429/5xx as a client sees it.

    Requests whose path ends with ``path`` are answered with ``statuses`` in turn, one per
    request, and forwarded to ``upstream`` once the statuses are used up; every other request
    is forwarded at once. ``hits`` counts the requests to ``path``.
    """

    def __init__(self, upstream: str, path: str, statuses: list[int]) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.path = path
        self.statuses = list(statuses)
        self.hits = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = proxy._next_status(self.path)
                if status is not None:
                    proxy._answer_error(self, status)
                else:
                    proxy._forward(self, body)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="flaky-proxy", daemon=True
        )
        self._thread.start()

    def _next_status(self, path: str) -> int | None:
        if not path.split("?")[0].endswith(self.path):
            return None
        with self._lock:
            self.hits += 1
            return self.statuses.pop(0) if self.statuses else None

    @staticmethod
    def _answer_error(handler: http.server.BaseHTTPRequestHandler, status: int) -> None:
        # The way a server or a gateway in front of it answers: MLflow's JSON error for
        # a server's own 500/503, plain text for the others.
        if status in (500, 503):
            code = "INTERNAL_ERROR" if status == 500 else "TEMPORARILY_UNAVAILABLE"
            body = json.dumps({"error_code": code, "message": f"injected {status}"}).encode()
            content_type = "application/json"
        else:
            body = f"injected {status}".encode()
            content_type = "text/plain"
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _forward(self, handler: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {
                k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")
            }
            conn.request(handler.command, handler.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def flaky_proxy() -> Iterator[Callable[[str, str, list[int]], FlakyProxy]]:
    """``flaky_proxy(upstream, path, statuses)``: a :class:`FlakyProxy`, closed at teardown."""
    made: list[FlakyProxy] = []

    def make(upstream: str, path: str, statuses: list[int]) -> FlakyProxy:
        made.append(FlakyProxy(upstream, path, statuses))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


# -- MLflow's own HTTP settings, and a proxy that loses answers (no duplicate runs) ---------

_MLFLOW_HTTP_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


@pytest.fixture
def mlflow_http_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's default HTTP settings (7 retries with backoff, 120 s timeout), as a user has
    them: runactors must bound its calls by ``retry_timeout`` without any help from the
    environment. Worker processes started during the test inherit the same."""
    for name in _MLFLOW_HTTP_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def mlflow_server_default_http(
    _mlflow_server_process: MlflowServer, mlflow_http_defaults: None
) -> MlflowServer:
    """The session's real ``mlflow server``, running, with MLflow's default HTTP settings in
    the environment (not ``fail_fast_http``)."""
    _mlflow_server_process.start()
    return _mlflow_server_process


class DroppingProxy:
    """A reverse proxy on 127.0.0.1 that forwards every request to ``upstream``, but for the
    first ``drops`` requests whose path ends with ``path`` closes the connection instead of
    answering, *after* the upstream handled it: a real lost response (the request landed).

    ``hits`` counts the requests to ``path`` that reached the proxy.
    """

    def __init__(self, upstream: str, path: str, drops: int = 1) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.path = path
        self.drops = drops
        self.hits = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                drop = proxy._should_drop(self.path)
                status, headers, data = proxy._forward(self, body)
                if drop:  # the upstream did it; the client never hears so
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dropping-proxy", daemon=True
        )
        self._thread.start()

    def _should_drop(self, path: str) -> bool:
        if not path.split("?")[0].endswith(self.path):
            return False
        with self._lock:
            self.hits += 1
            if self.drops > 0:
                self.drops -= 1
                return True
            return False

    def _forward(
        self, handler: http.server.BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {
                k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")
            }
            conn.request(handler.command, handler.path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def dropping_proxy() -> Iterator[Callable[..., DroppingProxy]]:
    """``dropping_proxy(upstream, path, drops=1)``: a :class:`DroppingProxy`, closed at
    teardown."""
    made: list[DroppingProxy] = []

    def make(upstream: str, path: str, drops: int = 1) -> DroppingProxy:
        made.append(DroppingProxy(upstream, path, drops))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()
