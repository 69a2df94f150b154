"""Shared fixtures: a real SQLite tracking store per test, both executors, and real faults
(a locked database, a hung server, a real ``mlflow server`` to stop, HTTP error statuses).

The fixtures only: what they are made of, and the plain helpers tests import, live in plain
modules (``servers``, ``stores``, ``liveness``, ``scripts``). A test module never imports
``conftest``: with ``tests/distributed`` collected in the same run, that name is whichever
conftest pytest loaded last.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from servers import (
    DROP,
    FAIL_FAST_HTTP_TIMEOUT,
    LoopbackServer,
    MlflowServer,
    ScriptedProxy,
)
from stores import SqliteLock

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

# -- the ``slow`` marker: what ``tox -e quick`` leaves out ------------------------------

# Fixtures that start a process or a server: a test that asks for one is slow.
SPAWNING_FIXTURES = frozenset(
    {
        "session_mlflow_server",
        "mlflow_server",
        "mlflow_server_uri",
        "mlflow_server_default_http",
        "postgres_uri",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that starts a process or a server: one that asks for a
    spawning fixture, runs on the process executor (its worker processes) or on PostgreSQL
    (the session's server), besides the
    tests and modules marked by hand (subprocesses of their own, long workloads).

    ``tox -e quick`` runs the rest, the developer's loop; ``tox`` runs everything.
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        fixtures = set(getattr(item, "fixturenames", ()))
        if (
            SPAWNING_FIXTURES & fixtures
            or params.get("executor") == "process"
            or any(isinstance(value, str) and "postgres" in value for value in params.values())
        ):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture
def fail_fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own HTTP retries off and a short request timeout, for this test.

    Set in the environment, so worker processes started during the test inherit them.
    """
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(FAIL_FAST_HTTP_TIMEOUT))


@pytest.fixture
def hung_server_timeout() -> int:
    """MLflow's HTTP request timeout (s) while ``hung_server`` runs: ``fail_fast_http``'s.

    A test whose call must stay in flight for the whole test overrides it:
    ``@pytest.mark.parametrize("hung_server_timeout", [LONG_HTTP_TIMEOUT])``.
    """
    return FAIL_FAST_HTTP_TIMEOUT


@pytest.fixture
def hung_server(
    fail_fast_http: None, hung_server_timeout: int, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a server that accepts connections and never answers.

    MLflow's HTTP settings are those of ``fail_fast_http``, but a request times out in
    ``hung_server_timeout`` seconds. At teardown the held connections are closed: a call
    still waiting fails at once.
    """
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(hung_server_timeout))
    server = LoopbackServer()
    try:
        yield server.uri
    finally:
        server.close()


@pytest.fixture
def sqlite_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    """runactors' own SQLite writes (the SQL fast path) give up on a locked database after
    this many seconds instead of MLflow's 20 (``RUNACTORS_SQLITE_BUSY_TIMEOUT``, inherited by
    worker processes started during the test): a lock held a few seconds makes them fail
    with a real "database is locked". MLflow's own calls still wait their 20 s."""
    monkeypatch.setenv("RUNACTORS_SQLITE_BUSY_TIMEOUT", "1")
    return 1.0


@pytest.fixture
def lock_store(tracking_uri: str) -> Iterator[Callable[..., SqliteLock]]:
    """``lock_store(hold=None)``: a :class:`SqliteLock` on the test's store, for ``with``;
    held for ``hold`` seconds at most, or (``None``) until the ``with`` block ends.

    Every lock made is released at teardown, even if the test failed while holding it.
    """
    path = tracking_uri.removeprefix("sqlite:///")
    made: list[SqliteLock] = []

    def lock(hold: float | None = None) -> SqliteLock:
        made.append(SqliteLock(path, hold))
        return made[-1]

    yield lock
    for item in made:
        item.__exit__(None, None, None)


# -- a real ``mlflow server`` -----------------------------------------------------------


@pytest.fixture(scope="session")
def session_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The session's one ``mlflow server``: started by the first test that asks for it (through
    ``mlflow_server`` or ``mlflow_server_uri``), stopped when the session ends."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop(signal.SIGTERM)


@pytest.fixture
def mlflow_server(session_mlflow_server: MlflowServer, fail_fast_http: None) -> MlflowServer:
    """A real ``mlflow server`` shared by the session, running when the test starts.

    Startup takes seconds, so one server serves every test (each in its own experiment); a
    test may stop it and start it again (``MlflowServer.stop``/``start``), and the next test
    finds it running whatever this one left. MLflow's HTTP settings are ``fail_fast_http``.
    """
    session_mlflow_server.start()
    return session_mlflow_server


@pytest.fixture
def mlflow_server_uri(session_mlflow_server: MlflowServer) -> str:
    """The URI of the same server, running, for tests that only use it: MLflow's own HTTP
    settings (retries, timeout) are left as they are."""
    session_mlflow_server.start()
    return session_mlflow_server.uri


# -- HTTP error statuses on the wire ----------------------------------------------------


@pytest.fixture
def flaky_proxy() -> Iterator[Callable[[str, str, list[int]], ScriptedProxy]]:
    """``flaky_proxy(upstream, path, statuses)``: a :class:`ScriptedProxy` that answers the
    requests to ``path`` with ``statuses`` first, closed at teardown."""
    made: list[ScriptedProxy] = []

    def make(upstream: str, path: str, statuses: list[int]) -> ScriptedProxy:
        made.append(ScriptedProxy(upstream, path, list(statuses)))
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
    session_mlflow_server: MlflowServer, mlflow_http_defaults: None
) -> MlflowServer:
    """The session's real ``mlflow server``, running, with MLflow's default HTTP settings in
    the environment (not ``fail_fast_http``)."""
    session_mlflow_server.start()
    return session_mlflow_server


@pytest.fixture
def dropping_proxy() -> Iterator[Callable[..., ScriptedProxy]]:
    """``dropping_proxy(upstream, path, drops=1)``: a :class:`ScriptedProxy` that loses the
    answers to the first ``drops`` requests to ``path`` (they land upstream), closed at
    teardown."""
    made: list[ScriptedProxy] = []

    def make(upstream: str, path: str, drops: int = 1) -> ScriptedProxy:
        made.append(ScriptedProxy(upstream, path, [DROP] * drops))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


# -- a real PostgreSQL server -----------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """``postgresql+psycopg://...`` of a database on a throwaway PostgreSQL 15 server (one per
    test session, on 127.0.0.1), stopped and removed at the end. Skipped, saying why, only
    where the server binaries are missing."""
    import postgres

    reason = postgres.missing_binaries()
    if reason is not None:
        pytest.skip(reason)
    server = postgres.PostgresServer()
    try:
        server.start()
        yield server.uri
    finally:
        server.stop()
