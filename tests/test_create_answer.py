"""A tracking server whose ``runs/create`` answer carries no run ID (``200 {}``: a broken
proxy, a stub, a misrouted path) fails that creation: the run is not taken to exist with
the ID ``''``. On both executors, against a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from client import QueueingClient


class EmptyAnswerServer:
    """An HTTP server on 127.0.0.1 answering every request with ``200 {}``; ``paths`` lists
    the paths it was asked for."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.paths.append(self.path.split("?")[0])
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval: close() waits for the serving loop to notice (0.5 s by default).
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="empty-answer-server",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def empty_answer_server() -> Iterator[EmptyAnswerServer]:
    server = EmptyAnswerServer()
    yield server
    server.close()


def test_a_creation_answered_without_a_run_id_fails_that_creation(
    empty_answer_server: EmptyAnswerServer, executor: str, fail_fast_http: None
) -> None:
    client = QueueingClient(empty_answer_server.uri, executor=executor, retry_timeout=1)
    try:
        pending = client.create_run("0", run_name="trial")
        client.log_metrics(pending, {"loss": 0.5}, step=0)
        with pytest.raises(MlflowException, match="without a run ID"):
            client.flush()
        with pytest.raises(MlflowException) as raised:
            pending.resolve(timeout=30)
        message = str(raised.value)
        assert "without a run ID" in message
        assert f"{empty_answer_server.uri}/api/2.0/mlflow/runs/create" in message
        (run,) = client.status().runs
        assert run.run_id in (None, ""), run
        assert any("without a run ID" in error for error in run.errors), run.errors
        assert run.logged["metrics"] == 0, run
        # One creation, no retries (a 200 is an answer, not an outage), nothing logged to ''.
        assert empty_answer_server.paths == ["/api/2.0/mlflow/runs/create"]
    finally:
        try:
            client.close()
        except MlflowException:
            pass  # the failed creation fails the last flush too
