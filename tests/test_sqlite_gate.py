"""The SQLite gate: runactors' writers to one SQLite file take turns on a lock of the process
(woken at once) instead of SQLite's polling busy handler; the wait is bounded like a request."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from actors.delivery import _sqlite_gate
from actors.delivery._sqlite_gate import database_gate, database_key, uri_database_key
from client import QueueingClient


def test_one_gate_per_file_whatever_the_uri_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "sub", tmp_path / "link")
    same = {
        uri_database_key("sqlite:///mlruns.db"),
        uri_database_key(f"sqlite:///{tmp_path}/mlruns.db"),
        uri_database_key(f"sqlite:///{tmp_path}/sub/../mlruns.db"),
    }
    assert same == {str(tmp_path.resolve() / "mlruns.db")}
    assert uri_database_key(f"sqlite:///{tmp_path}/link/a.db") == database_key(
        str(tmp_path / "sub" / "a.db")
    )
    for other in ("sqlite://", "sqlite:///:memory:", "postgresql://u@h/db", "http://h:5000"):
        assert uri_database_key(other) is None, other
    assert uri_database_key("file:///tmp/mlruns") is None


def _hold(uri: str, release: threading.Event, held: threading.Event) -> threading.Thread:
    def hold() -> None:
        with database_gate(uri_database_key(uri)):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert held.wait(10)
    return thread


def test_a_writer_waits_its_turn_and_goes_as_soon_as_the_gate_is_free(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/a.db"
    release, held = threading.Event(), threading.Event()
    holder = _hold(uri, release, held)
    entered = threading.Event()

    def writer() -> None:
        with database_gate(uri_database_key(uri)):
            entered.set()

    waiting = threading.Thread(target=writer, daemon=True)
    waiting.start()
    assert not entered.wait(0.3)  # its turn has not come
    with database_gate(uri_database_key(f"sqlite:///{tmp_path}/b.db")):  # another file: no wait
        pass
    with database_gate(uri_database_key("postgresql://u@h/db")):  # not SQLite: no gate at all
        pass
    release.set()
    assert entered.wait(10)
    holder.join(10)
    waiting.join(10)


def test_a_call_that_waited_gate_wait_goes_ahead_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that hangs delays the others by GATE_WAIT, and fails none of them."""
    monkeypatch.setattr(_sqlite_gate, "GATE_WAIT", 0.3)
    uri = f"sqlite:///{tmp_path}/a.db"
    release, held = threading.Event(), threading.Event()
    holder = _hold(uri, release, held)
    try:
        started = time.monotonic()
        with database_gate(uri_database_key(uri)):
            waited = time.monotonic() - started
        assert held.is_set() and not release.is_set()  # the holder still holds it
        assert waited >= 0.3
        with database_gate(uri_database_key(uri)):  # and again: nothing was left held by the first
            pass
    finally:
        release.set()
        holder.join(10)


def test_the_gate_is_reentrant_in_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GATE_WAIT far longer than the test waits: a gate that is not reentrant would make the
    # nested acquisition wait it out (and then go ahead without the gate), not return at once.
    monkeypatch.setattr(_sqlite_gate, "GATE_WAIT", 600.0)
    uri = f"sqlite:///{tmp_path}/a.db"
    nested_wait: list[float] = []

    def nest() -> None:
        with database_gate(uri_database_key(uri)):
            started = time.monotonic()
            with database_gate(uri_database_key(uri)):
                nested_wait.append(time.monotonic() - started)

    thread = threading.Thread(target=nest, daemon=True)
    thread.start()
    thread.join(5)
    alive = thread.is_alive()
    if alive:  # free it so that the thread ends (a plain lock can be released by anyone)
        with contextlib.suppress(RuntimeError):
            _sqlite_gate._gate(str(database_key(f"{tmp_path}/a.db"))).release()
        thread.join(5)
    assert not alive and nested_wait and nested_wait[0] < 0.5, nested_wait
    with database_gate(uri_database_key(uri)):  # and nothing is left held
        pass


def test_a_forked_child_finds_the_gate_free(tmp_path: Path) -> None:
    """Forked while another thread holds the gate, the child still writes the file."""
    uri = f"sqlite:///{tmp_path}/a.db"
    release, held = threading.Event(), threading.Event()
    holder = _hold(uri, release, held)
    try:
        pid = os.fork()
        if pid == 0:  # the child: the holder thread does not exist here
            code = 1
            try:
                started = time.monotonic()
                # would wait GATE_WAIT on the parent's holder
                with database_gate(uri_database_key(uri)):
                    code = 0 if time.monotonic() - started < 0.5 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        holder.join(10)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["thread", "process"])
def test_writers_of_one_file_lose_nothing_while_taking_turns(tmp_path: Path, executor: str) -> None:
    """Two clients of one process (and their pool threads) write one SQLite file at once:
    every run is whole."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    store = MlflowClient(uri)
    experiment_id = store.create_experiment("gate")
    clients = [QueueingClient(uri, executor=executor, max_workers=4) for _ in range(2)]  # type: ignore[arg-type]
    try:
        runs = []
        for client in clients:
            for i in range(6):
                run = client.create_run(experiment_id, run_name=f"r{i}")
                for step in range(300):
                    client.log_metrics(run, {"a": float(step), "b": -float(step)}, step=step)
                client.log_params(run, {"i": i})
                client.set_terminated(run)
                runs.append(run)
        flushes = [client.flush(synchronous=False) for client in clients]  # both at once
        for operations in flushes:
            operations.await_completion(timeout=120)  # raises what failed
        for run in runs:
            stored = store.get_run(run.resolve())
            assert stored.info.status == "FINISHED"
            assert len(store.get_metric_history(stored.info.run_id, "a")) == 300
            assert len(store.get_metric_history(stored.info.run_id, "b")) == 300
    finally:
        for client in clients:
            client.close()


def test_the_fast_paths_busy_timeout_is_mlflows_unless_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RUNACTORS_SQLITE_BUSY_TIMEOUT (seconds) sets the fast path's wait for a locked file;
    unset or unreadable, it is MLflow's 20 s."""
    monkeypatch.delenv(_sqlite_gate.BUSY_TIMEOUT_ENV, raising=False)
    assert _sqlite_gate.busy_timeout_ms() == 20_000
    for value, expected in (("1", 1_000), ("0.25", 250), ("0", 0)):
        monkeypatch.setenv(_sqlite_gate.BUSY_TIMEOUT_ENV, value)
        assert _sqlite_gate.busy_timeout_ms() == expected
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(_sqlite_gate.BUSY_TIMEOUT_ENV, bad)
        assert _sqlite_gate.busy_timeout_ms() == 20_000, bad
