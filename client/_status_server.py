"""``StatusServer``: every open client's status over HTTP, as JSON and as Prometheus metrics.

``GET /status`` answers ``{"pid": ..., "clients": [ClientStatus.to_dict(), ...]}``;
``GET /healthz`` 200 ``ok``, or 503 and one line per fault of an open client (a Kubernetes
liveness probe, see :mod:`client._health`); ``GET /metrics`` the Prometheus text
format, made by ``prometheus_client`` from a collector over a private registry (the
process's default registry is left alone). Both read the runs'
records as ``status()`` does: no actor is asked anything, so a request never waits on a flush
and the ``log_*`` path pays nothing for being watched. The counters come from
:data:`actors.status._status.TOTALS`, which keeps what closed clients did: they never go down.

Each server listens on a daemon thread (one more thread per connection, at most
``MAX_CONNECTIONS``, each connection closed after ``CONNECTION_TIMEOUT`` s) until
``close()`` or interpreter exit; its port can be bound again at once after it closes.
``RUNACTORS_STATUS_PORT`` starts one with the process's first client (host
``RUNACTORS_STATUS_HOST``, default 127.0.0.1); if that fails it warns and the client
works on. There is no authentication: binding beyond loopback is the caller's choice.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from actors import FLUSH_BUCKETS, KINDS, STATES, TOTALS, ClientStatus
from client._health import health_problems
from client._registry import STATUS_PORT_ENV, open_clients

_logger = logging.getLogger("runactors.status_server")

STATUS_HOST_ENV = "RUNACTORS_STATUS_HOST"
DEFAULT_HOST = "127.0.0.1"
CONNECTION_TIMEOUT = 5.0  # seconds a connection may last, whatever it does
MAX_CONNECTIONS = 64  # connections handled at once (a thread each); others wait
LISTEN_BACKLOG = 1024  # connections waiting to be accepted (the stdlib's is 5)


def client_statuses() -> list[ClientStatus]:
    """A snapshot of every open client of this process, oldest session first."""
    statuses = [client.status() for client in open_clients()]
    return sorted(statuses, key=lambda s: (s.client_id is None, s.client_id or 0))


def status_document() -> dict[str, Any]:
    """What ``GET /status`` answers."""
    return {"pid": os.getpid(), "clients": [s.to_dict() for s in client_statuses()]}


class StatusCollector(Collector):
    """The runactors metric families, computed at each scrape from the runs' records."""

    def collect(self) -> Iterator[Metric]:
        statuses = client_statuses()
        totals = TOTALS.snapshot()
        states = dict.fromkeys(STATES, 0)
        queued = dict.fromkeys(KINDS, 0)
        spooled = dict.fromkeys(KINDS, 0)
        for status in statuses:
            for run in status.runs:
                states[run.state] = states.get(run.state, 0) + 1
                for kind in KINDS:
                    queued[kind] += run.queued.get(kind, 0)
                    spooled[kind] += run.spooled.get(kind, 0)
        runs = GaugeMetricFamily(
            "runactors_runs", "Runs of the open clients, by state.", labels=["state"]
        )
        for state, n in states.items():
            runs.add_metric([state], n)
        yield runs
        yield _per_kind(
            GaugeMetricFamily(
                "runactors_queued_entities",
                "Entities queued or in flight, not yet acknowledged by the store.",
                labels=["kind"],
            ),
            queued,
        )
        yield _per_kind(
            GaugeMetricFamily(
                "runactors_spooled_entities",
                "Entities on disk in the spool, waiting to be re-sent.",
                labels=["kind"],
            ),
            spooled,
        )
        yield _per_kind(
            CounterMetricFamily(
                "runactors_logged_entities",
                "Entities sent and acknowledged by the store since the process started.",
                labels=["kind"],
            ),
            totals.logged,
        )
        yield CounterMetricFamily(
            "runactors_failed_operations",
            "Failed operations recorded in runs' errors since the process started.",
            value=totals.errors,
        )
        yield CounterMetricFamily(
            "runactors_retries",
            "Transient failures retried since the process started.",
            value=totals.retries,
        )
        cumulative, buckets = 0, []
        for bound, n in zip((*FLUSH_BUCKETS, float("inf")), totals.flush_buckets, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "runactors_flush_seconds",
            "Duration of each run's flush rounds (one observation per run per round).",
            buckets=buckets,
            sum_value=totals.flush_seconds,
        )


def _per_kind(family: GaugeMetricFamily | CounterMetricFamily, counts: dict[str, int]) -> Metric:
    for kind in KINDS:
        family.add_metric([kind], counts.get(kind, 0))
    return family


class _Server(ThreadingHTTPServer):
    """A threaded HTTP server whose connections are bounded in number and in time.

    At most ``max_connections`` handler threads; further connections wait in the listen
    queue (``request_queue_size``; the kernel caps it at ``net.core.somaxconn``) rather
    than being dropped. Each connection is closed after ``timeout`` seconds whatever it
    does (idle, half a request, a byte at a time): a stalled client pins a thread that long
    at most. ``close_all`` ends every connection at once, so a close never waits on one.
    """

    daemon_threads = True  # a slow scraper never holds the process at exit
    # SO_REUSEADDR: a restarted service binds its port again although the connections of
    # the last scrapes sit in TIME_WAIT. Linux still refuses a second listener on the port
    # (SO_REUSEPORT, which would share it, is not set).
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        timeout: float,
        max_connections: int,
    ) -> None:
        self.registry = registry
        self.connection_timeout = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._connections: dict[socket.socket, float] = {}  # open ones, and their deadlines
        self._connections_lock = threading.Lock()
        self._closing = False
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # On the serving thread: wait for a free handler slot (each is given back within
        # ``timeout`` s); meanwhile new connections wait in the listen queue.
        while not self._slots.acquire(timeout=0.2):
            if self._closing:
                self.shutdown_request(request)
                return
            self.service_actions()  # the connections holding the slots still time out
        with self._connections_lock:
            self._connections[request] = time.monotonic() + self.connection_timeout
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)  # the caller closes the request
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: socket.socket) -> None:
        with self._connections_lock:
            known = self._connections.pop(request, None) is not None
        if known:
            self._slots.release()

    def service_actions(self) -> None:
        """Every poll interval, on the serving thread: end connections past their time."""
        now = time.monotonic()
        with self._connections_lock:
            late = [sock for sock, deadline in self._connections.items() if deadline <= now]
        for sock in late:
            _cut(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A connection cut (its time was up, or the server closes) or reset by its client:
        # nothing to report beyond a debug line, never a traceback on stderr.
        _logger.debug("connection from %s ended", client_address, exc_info=True)

    def close_all(self) -> None:
        """End every open connection now (their handler threads then finish at once)."""
        self._closing = True
        with self._connections_lock:
            connections = list(self._connections)
        for sock in connections:
            _cut(sock)


def _cut(sock: socket.socket) -> None:
    # shutdown, not close: the handler thread blocked in recv/send on it wakes up (EOF or
    # EPIPE), ends, and closes the socket itself.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its handler


_PATHS = b"runactors: /status, /metrics, /healthz\n"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Per read and write too, a backstop for the server's cut at the connection's end.
        self.connection.settimeout(self.server.connection_timeout)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path == "/status":
                body = json.dumps(status_document()).encode()
                self._send(200, "application/json", body)
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
            elif path == "/healthz":
                problems = health_problems()
                text = "".join(f"{problem}\n" for problem in problems) or "ok\n"
                self._send(503 if problems else 200, "text/plain; charset=utf-8", text.encode())
            elif path == "":
                self._send(200, "text/plain; charset=utf-8", _PATHS)
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: " + _PATHS)
        except Exception as exc:  # never a dead handler thread without an answer
            _logger.exception("the status endpoint failed")
            self._send(500, "text/plain; charset=utf-8", f"{exc!r}\n".encode())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        _logger.debug(format, *args)


def _check_address(host: Any, port: Any) -> tuple[str, int]:
    if not isinstance(host, str) or not host.strip():
        raise MlflowException(
            f"Invalid host {host!r}: expected a host name or address, e.g. '127.0.0.1'.",
            INVALID_PARAMETER_VALUE,
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise MlflowException(
            f"Invalid port {port!r}: expected an integer from 0 (any free port) to 65535.",
            INVALID_PARAMETER_VALUE,
        )
    return host.strip().strip("[]"), port


# Servers still serving, kept alive until closed (a caller may drop the object) and closed
# at exit.
_servers: set[StatusServer] = set()
_servers_lock = threading.Lock()


class StatusServer:
    """An HTTP server of this process's status: ``GET /status``, ``/metrics``, ``/healthz``.

    Made by ``QueueingClient.serve_status()``; serves every open client of the process (not
    only the one that made it) until :meth:`close`, also as a context manager. Each
    connection is closed after ``timeout`` seconds, answered or not.

    Args:
        host: the address to bind (no authentication: beyond loopback is your choice).
        port: the port; ``0``: a free one (then read :attr:`port` or :attr:`url`).
        timeout: seconds a connection may last.

    Raises:
        MlflowException: a bad host, port or timeout (``INVALID_PARAMETER_VALUE``), or the
            address is in use (``RESOURCE_ALREADY_EXISTS``).
    """

    def __init__(
        self, host: str = DEFAULT_HOST, port: int = 0, *, timeout: float = CONNECTION_TIMEOUT
    ) -> None:
        host, port = _check_address(host, port)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise MlflowException(
                f"Invalid timeout {timeout!r}: expected a number of seconds > 0.",
                INVALID_PARAMETER_VALUE,
            )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatusCollector())
        try:
            self._server = _Server((host, port), registry, float(timeout), MAX_CONNECTIONS)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MlflowException(
                    f"Cannot serve the runactors status on {host}:{port}: the address is "
                    "already in use (choose another port, or 0 for any free one).",
                    RESOURCE_ALREADY_EXISTS,
                ) from exc
            raise MlflowException(
                f"Cannot serve the runactors status on {host}:{port}: {exc}",
                INVALID_PARAMETER_VALUE,
            ) from exc
        address = self._server.server_address
        self.host, self.port = str(address[0]), int(address[1])
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"runactors-status-{self.port}",
            daemon=True,
        )
        with _servers_lock:
            _servers.add(self)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop listening and stop the serving thread; calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with _servers_lock:
            _servers.discard(self)
        self._server.close_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._server.shutdown()
        self._server.server_close()  # joins the handler threads, ended by close_all

    def _forget_in_child(self) -> None:
        # A forked child has no serving thread: close its copy of the listening socket so
        # that the port is the parent's alone (and free once the parent closes it).
        self._closed = True
        self._server.socket.close()

    def __enter__(self) -> StatusServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StatusServer({self.url!r}{', closed' if self._closed else ''})"


_env_started = False
_env_lock = threading.Lock()


def start_from_environment() -> StatusServer | None:
    """Start the server ``RUNACTORS_STATUS_PORT`` asks for, once per process.

    Never raises: a bad value or a port in use is a warning, and the client goes on.
    """
    global _env_started

    with _env_lock:
        if _env_started:
            return None
        _env_started = True
    value = os.environ.get(STATUS_PORT_ENV, "").strip()
    host = os.environ.get(STATUS_HOST_ENV, "").strip() or DEFAULT_HOST
    try:
        port = int(value)
    except ValueError:
        _logger.warning(
            "%s=%r is not a port number; no status server started.",
            STATUS_PORT_ENV,
            value,
        )
        return None
    try:
        server = StatusServer(host, port)
    except MlflowException as exc:
        _logger.warning("%s: %s", STATUS_PORT_ENV, exc.message)
        return None
    except Exception as exc:  # pragma: no cover - the client must work on regardless
        _logger.warning("%s: no status server: %r", STATUS_PORT_ENV, exc)
        return None
    _logger.info("status served at %s (/status, /metrics, /healthz)", server.url)
    return server


def _close_all() -> None:
    with _servers_lock:
        servers = list(_servers)
    for server in servers:
        server.close()


def _after_fork_in_child() -> None:
    global _servers_lock, _env_lock
    _servers_lock, _env_lock = threading.Lock(), threading.Lock()
    for server in list(_servers):
        server._forget_in_child()
    _servers.clear()


atexit.register(_close_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
