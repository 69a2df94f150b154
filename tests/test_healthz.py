"""``GET /healthz``: 200 ``ok`` while every open client works, 503 naming each real fault.

A real HTTP client (urllib) asks a real status server while the faults are made for real: a
run's actor and the supervisor actor stopped (the ticker thread then dies at its next tick), a
worker process of the process executor killed with SIGKILL, the spool's journal deleted, its
writes failing (no file may grow: ``RLIMIT_FSIZE``) and its folder replaced by a file, the
keeper killed more often than it is restarted. Where the runtime heals the fault by itself (a
new run actor, a new worker process at the next flush), the probe answers 200 again and the
data logged after it is read back from the store with MLflow's own client.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import actors.runtime._system as system_module
from actors import get_system
from client import QueueingClient, StatusServer

WAIT = 60.0  # seconds: a generous bound for a loaded machine, never a timing assertion


def healthz(server: StatusServer) -> tuple[int, str]:
    """The probe's status code and body."""
    try:
        with urllib.request.urlopen(server.url + "/healthz", timeout=30) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), error.read().decode()


def wait_for_code(server: StatusServer, code: int) -> str:
    """Ask until the probe answers ``code`` (a fault is seen once the OS has acted on it);
    return the body."""
    deadline = time.monotonic() + WAIT
    while True:
        got, body = healthz(server)
        if got == code or time.monotonic() > deadline:
            assert (got, body) == (code, body), f"/healthz answered {got}: {body!r}"
            return body
        time.sleep(0.02)


def metric_history(store: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in store.get_metric_history(run_id, "loss"))


@pytest.fixture
def own_system(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An actor system for this test alone: one whose supervisor the test kills must not be
    the one later tests in this process use."""
    monkeypatch.setattr(system_module, "_system", None)
    yield
    system = system_module._system
    if system is not None:
        system.ticker.stop(5)
        system.supervisor.stop(block=False)


def test_healthy_clients_answer_ok(experiment_id: str, store: MlflowClient, tmp_path: Path) -> None:
    """Every check active (a flush_interval, a spool, a started pool): 200 ``ok``. (The
    process executor's healthy pool: in the killed worker's test, before and after.)"""
    client = QueueingClient(flush_interval=0.05, spool_dir=tmp_path / "spool", max_workers=1)
    idle = QueueingClient()  # never used: no session, nothing to check
    with client.serve_status() as server:
        assert healthz(server) == (200, "ok\n")
        run = client.create_run(experiment_id)
        client.log_metrics(run, {"loss": 1.0}, step=0)
        client.flush()
        assert healthz(server) == (200, "ok\n")
        client.close()
        idle.close()
        assert healthz(server) == (200, "ok\n")
    assert metric_history(store, run.resolve()) == [0]


def test_a_stopped_run_actor_is_reported_until_a_new_one_takes_over(
    experiment_id: str, store: MlflowClient
) -> None:
    client = QueueingClient()
    with client.serve_status() as server:
        run = client.create_run(experiment_id)
        client.log_metrics(run, {"loss": 1.0}, step=0)
        client.flush()  # the run's actor is parked, idle, for the next round
        run_id = run.resolve()
        session = client._session
        assert session is not None
        handle = next(iter(session.handles.values()))
        assert handle.ref is not None
        handle.ref.stop()  # the supervisor still counts on it

        code, body = healthz(server)
        assert code == 503
        assert body == f"client {session.id}: run {run_id}: its actor is dead\n"

        client.log_metrics(run, {"loss": 0.5}, step=1)
        client.flush()  # the supervisor finds it dead and starts another
        assert healthz(server) == (200, "ok\n")
        client.close()
    assert metric_history(store, run_id) == [0, 1]


def test_a_dead_supervisor_and_its_ticker_are_reported(
    own_system: None, experiment_id: str
) -> None:
    client = QueueingClient(flush_interval=0.05)
    with client.serve_status() as server:
        run = client.create_run(experiment_id)  # opens the session: the ticker is running
        client.log_metrics(run, {"loss": 1.0}, step=0)
        system = get_system()
        system.supervisor.stop()
        # The ticker's next tick finds no supervisor and its thread ends.
        system.ticker._thread.join(WAIT)

        code, body = healthz(server)
        session = client._session
        assert session is not None
        assert code == 503
        assert body.splitlines() == [
            f"client {session.id}: actor system: the supervisor actor is dead (no flush can start)",
            f"client {session.id}: actor system: the ticker thread (runactors-ticker) died: no "
            "background flush (flush_interval) happens",
        ]
        with contextlib.suppress(Exception):  # nobody left to close it
            client.close(timeout=1)


@pytest.mark.slow  # worker processes
def test_a_killed_worker_process_is_reported_until_replaced(
    experiment_id: str, store: MlflowClient
) -> None:
    client = QueueingClient(executor="process", max_workers=1, flush_interval=60)
    with client.serve_status() as server:
        run = client.create_run(experiment_id)
        client.log_metrics(run, {"loss": 1.0}, step=0)
        client.flush()
        assert healthz(server) == (200, "ok\n")
        session = client._session
        assert session is not None
        pool = session.started_executor()
        assert pool is not None
        [pid] = pool.worker_pids()  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)

        body = wait_for_code(server, 503)
        assert body == (
            f"client {session.id}: worker pool runactors-{session.id}: its worker process "
            f"runactors-{session.id}-worker-0[pid {pid}] died (a new one starts at its next "
            "job)\n"
        )

        client.log_metrics(run, {"loss": 0.5}, step=1)
        client.flush()  # a new worker process performs it
        assert healthz(server) == (200, "ok\n")
        client.close()
    assert metric_history(store, run.resolve()) == [0, 1]


def refused_uri() -> str:
    """A tracking server address where nothing listens: every call fails transiently."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_removed_journal_is_reported(
    tmp_path: Path, experiment_id: str, fail_fast_http: None
) -> None:
    spool_dir = tmp_path / "spool"
    client = QueueingClient(refused_uri(), spool_dir=spool_dir, retry_timeout=0.1)
    with client.serve_status() as server:
        run = client.create_run(experiment_id)
        client.log_metrics(run, {"loss": 1.0}, step=0)
        with pytest.raises(Exception, match="spooled"):
            client.flush()  # nothing listens: spooled, the journal is open
        assert healthz(server) == (200, "ok\n")
        [journal] = spool_dir.glob("runactors-*.spool")
        for path in spool_dir.glob(journal.name + "*"):  # with SQLite's -wal and -shm
            path.unlink()

        code, body = healthz(server)
        session = client._session
        assert session is not None
        assert code == 503
        assert body == (
            f"client {session.id}: spool: the journal {journal} was removed: what it holds and "
            "what is spooled next cannot be replayed\n"
        )
        client.close(timeout=1)


def test_a_spool_folder_that_cannot_be_written_is_reported(
    tmp_path: Path, experiment_id: str
) -> None:
    spool_dir = tmp_path / "spool"
    # A run addressed by its ID, and a journal interval longer than the test: what is logged
    # is delivered and acknowledged before any commit, so no journal exists, and the folder
    # is what the spool needs to write in.
    run_id = MlflowClient().create_run(experiment_id).info.run_id
    client = QueueingClient(spool_dir=spool_dir, journal_interval=60)
    with client.serve_status() as server:
        client.log_metrics(run_id, {"loss": 1.0}, step=0)
        client.flush()
        assert list(spool_dir.iterdir()) == []
        assert healthz(server) == (200, "ok\n")
        # A regular file where the folder was (a permission bit would not stop root).
        spool_dir.rmdir()
        spool_dir.write_text("not a folder")

        code, body = healthz(server)
        session = client._session
        assert session is not None
        assert code == 503
        assert body == f"client {session.id}: spool: cannot write in {spool_dir}: Not a directory\n"

        spool_dir.unlink()
        spool_dir.mkdir(mode=0o700)
        assert healthz(server) == (200, "ok\n")
        client.close()


@contextlib.contextmanager
def no_file_may_grow() -> Iterator[None]:
    """While inside: no file of this process may grow (``RLIMIT_FSIZE`` at 0, as on a full
    disk: a write past a file's end fails with EFBIG; SIGXFSZ ignored, not fatal)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_journal_that_cannot_be_written_is_reported(
    tmp_path: Path, experiment_id: str, fail_fast_http: None
) -> None:
    # Nothing listens at the store, and nothing is flushed: only the journal is written.
    client = QueueingClient(
        refused_uri(), spool_dir=tmp_path / "spool", journal_interval=0.01, retry_timeout=0.1
    )
    with client.serve_status() as server:
        run = client.create_run(experiment_id)
        client.log_metrics(run, {"loss": 1.0}, step=0)
        deadline = time.monotonic() + WAIT
        while not list((tmp_path / "spool").glob("runactors-*.spool-wal")):  # written
            assert time.monotonic() < deadline
            time.sleep(0.01)
        [journal] = (tmp_path / "spool").glob("runactors-*.spool")
        assert client.status().journal_error is None
        assert healthz(server) == (200, "ok\n")
        session = client._session
        assert session is not None

        with no_file_may_grow():
            client.log_metrics(run, {"loss": 2.0}, step=1)
            while client.status().journal_error is None:  # the next commit fails
                assert time.monotonic() < deadline, "no journal write failed"
                time.sleep(0.01)
            error = client.status().journal_error
            code, body = healthz(server)
        assert error is not None and f"Journal {journal}: write failed" in error, error
        assert client.status().to_dict()["journal_error"] == error
        assert code == 503
        assert body == (
            f"client {session.id}: spool: writing the journal {journal} failed ({error}): "
            "what was logged since is only in memory until a write succeeds\n"
        )

        wait_for_code(server, 200)  # the disk has room again: the next commit writes it all
        assert client.status().journal_error is None
        client.close(timeout=10)  # what close sends fails at once: spooled, nothing lost


@pytest.mark.slow  # keeper processes
def test_a_keeper_dead_for_good_is_reported(
    tmp_path: Path, tracking_uri: str, experiment_id: str
) -> None:
    from actors.keeper import LINK
    from actors.keeper._link import MAX_RESTARTS

    client = QueueingClient(tracking_uri, spool_dir=tmp_path / "spool")
    with client.serve_status() as server:
        client.create_run(experiment_id)
        assert client.status().keeper == "running"
        assert healthz(server) == (200, "ok\n")
        deadline = time.monotonic() + WAIT
        for _ in range(MAX_RESTARTS + 1):  # a death more than restarts allow, within seconds
            pid = LINK.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            while LINK.pid in (pid, None) and not LINK.dead:  # restarted, or not any more
                assert time.monotonic() < deadline, "the keeper was not restarted"
                time.sleep(0.01)
        assert LINK.dead and client.status().keeper == "dead"
        assert not client.keeper_healthy()
        session = client._session
        assert session is not None
        assert healthz(server) == (
            503,
            f"client {session.id}: its keeper process died and is not restarted "
            "(see status().keeper)\n",
        )
        client.close()
    assert client.status().keeper == "stopped"


def test_the_documented_liveness_probe_asks_healthz() -> None:
    """operations.md's Kubernetes example probes this endpoint on the port the service
    serves (RUNACTORS_STATUS_PORT), bound beyond loopback so that the kubelet reaches it."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    [block] = [
        b for b in re.findall(r"^```yaml\n(.*?)^```$", text, re.S | re.M) if "livenessProbe" in b
    ]
    [container] = yaml.safe_load(block)["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    [port] = container["ports"]
    probe = container["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": port["name"]}
    assert port["containerPort"] == int(env["RUNACTORS_STATUS_PORT"])
    assert env["RUNACTORS_STATUS_HOST"] == "0.0.0.0"
