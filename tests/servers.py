"""Servers on 127.0.0.1 for the tests: a real ``mlflow server``, one that never answers, and a
reverse proxy with a per-request policy (forward, answer an error status, lose the answer, hold).
Shared by ``tests/conftest.py`` and ``tests/distributed/conftest.py`` (a plain module, so that
both import the same code whichever conftest pytest loaded last).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Final, Literal

# One HTTP attempt per call (the client retries transient failures itself) and a short wait
# for an answer, so that a hung or broken server costs a test seconds, not MLflow's minutes.
FAIL_FAST_HTTP_TIMEOUT = 10
# An HTTP timeout longer than any test waits: a call to a server that never answers stays
# in flight for the whole test (MLflow reads ``MLFLOW_HTTP_REQUEST_TIMEOUT`` as whole seconds).
LONG_HTTP_TIMEOUT = 90

SERVER_START_TIMEOUT = 120.0


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


def http_healthy(uri: str) -> bool:
    """Whether an MLflow server answers ``GET /health`` with 200."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1, one uvicorn worker, with a SQLite backend in
    ``root`` unless given another ``backend_store_uri`` (a PostgreSQL database, say).

    :meth:`stop` and :meth:`start` may be called any number of times: the server comes back
    on the same port with the same store, as a restarted tracking server does.
    """

    def __init__(self, root: Path, backend_store_uri: str | None = None) -> None:
        self.root = root
        self.db_path = root / "mlflow.db"
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.db_path}"
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
            self.backend_store_uri,
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
            time.sleep(0.1)  # a server is seen ready within 0.1 s of it

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


# What a proxy does with one request: forward it, answer this HTTP status instead, or
# forward it and then close the connection without answering (the request landed, the
# answer is lost).
FORWARD: Final = "forward"
DROP: Final = "drop"
Action = int | Literal["forward", "drop"]


class Proxy:
    """A reverse proxy on 127.0.0.1 in front of the tracking server ``upstream``, with a
    per-request policy: :meth:`policy` (a subclass's) decides for each request whether it is
    forwarded, answered with an error status, or forwarded and its answer dropped. A policy
    may also block, to hold the request; it runs on that request's own thread.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy._handle(self, body)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval: close() waits for the serving loop to notice, every test.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()

    def policy(self, path: str) -> Action:
        """What to do with a request to ``path`` (with its query): forward it, by default."""
        return FORWARD

    def _handle(self, handler: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        action = self.policy(handler.path)
        if action not in (FORWARD, DROP):
            self._answer_error(handler, int(action))
            return
        status, headers, data = self._forward(handler, body)
        if action == DROP:  # the upstream did it; the client never hears so
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.send_response(status)
        for key, value in headers:
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

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


class ScriptedProxy(Proxy):
    """A :class:`Proxy` that does ``actions`` in turn, one per request whose path ends with
    ``path``, and forwards once they are used up; every other request is forwarded at once.
    ``hits`` counts the requests to ``path``.

    Error statuses first (``[503, 429]``): a real HTTP 408/429/5xx as a client sees it.
    ``[DROP]``: the first request lands upstream and its answer is lost.
    """

    def __init__(self, upstream: str, path: str, actions: list[Action]) -> None:
        self.path = path
        self.actions = list(actions)
        self.hits = 0
        self._lock = threading.Lock()
        super().__init__(upstream)

    def policy(self, path: str) -> Action:
        if not path.split("?")[0].endswith(self.path):
            return FORWARD
        with self._lock:
            self.hits += 1
            return self.actions.pop(0) if self.actions else FORWARD
