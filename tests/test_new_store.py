"""A new SQLite store is created whole or not at all: a client interrupted (Ctrl-C, SIGKILL)
while MLflow creates its tables leaves either no database or a complete one, never a file
that every later MLflow client refuses ("table webhooks already exists")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from scripts import script_env

TIMEOUT = 120

# Opens a store the way every runactors client does (executor threads, worker processes,
# replay), in a fork per URI read from stdin: MLflow is imported once ("ready"), not once per
# trial (about 2 s of CPU each), and each fork is a process of its own to interrupt, as the
# process executor's workers are forks of a pre-imported template. A fork says its PID,
# then "done" once the store is open, and ends as any interpreter does (a Ctrl-C's
# KeyboardInterrupt unwinds through the creation); the parent then says "exited".
CHILD = textwrap.dedent(
    """
    import os
    import sys
    from actors.delivery._store import make_client

    print("ready", flush=True)
    for uri in iter(sys.stdin.readline, ""):
        pid = os.fork()
        if pid == 0:
            print(os.getpid(), flush=True)
            make_client(uri.strip())
            print("done", flush=True)
            break
        os.waitpid(pid, 0)
        print("exited", flush=True)
    """
)


class Creator:
    """The pre-imported process of :data:`CHILD`: :meth:`start` forks one that creates a
    store; its PID is ``pid``."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            env=script_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def start(self, uri: str) -> tuple[int, float]:
        """Fork a process that creates the store ``uri``; its PID and when it started."""
        assert self.process.stdin is not None
        self.process.stdin.write(uri + "\n")
        self.process.stdin.flush()
        return int(self.readline()), time.monotonic()

    def wait_exited(self) -> list[str]:
        """The lines the fork printed after its PID, up to its end."""
        lines = []
        while (line := self.readline()) != "exited":
            assert line, "the creating process ended"
            lines.append(line)
        return lines

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def _usable_or_absent(folder: Path) -> str:
    """Check what the interrupted creation left; "absent" or "complete"."""
    db = folder / "mlflow.db"
    if not db.exists():
        return "absent"
    store = MlflowClient(f"sqlite:///{db}")
    assert [e.name for e in store.search_experiments()] == ["Default"]
    run = store.create_run("0")
    store.log_metric(run.info.run_id, "m", 1.0)
    assert store.get_run(run.info.run_id).data.metrics == {"m": 1.0}
    return "complete"


@pytest.mark.slow
def test_a_creation_interrupted_at_any_moment_leaves_no_database_or_a_complete_one(
    tmp_path: Path,
) -> None:
    creator = Creator()
    try:
        # How long creating the store takes here, from the fork to "done".
        _, started = creator.start(f"sqlite:///{tmp_path / 'calibrate' / 'mlflow.db'}")
        assert creator.wait_exited() == ["done"]
        took = time.monotonic() - started
        outcomes = []
        for trial in range(10):  # moments spread over the creation, Ctrl-C and SIGKILL in turn
            folder = tmp_path / f"t{trial}"
            pid, started = creator.start(f"sqlite:///{folder / 'mlflow.db'}")
            time.sleep(max(0.0, started + took * (trial + 0.5) / 10 - time.monotonic()))
            sig = signal.SIGINT if trial % 2 == 0 else signal.SIGKILL
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # the creation was over before this moment
                pass
            creator.wait_exited()
            outcomes.append(_usable_or_absent(folder))
            if sig == signal.SIGINT and folder.exists():  # stopped in Python: nothing left over
                assert {p.name for p in folder.iterdir()} <= {"mlflow.db"}, trial
    finally:
        creator.close()
    # The early moments stopped the creation before the store was in place.
    assert "absent" in outcomes, outcomes


def test_the_store_is_created_complete_and_an_existing_file_is_left_alone(tmp_path: Path) -> None:
    from actors import create_sqlite_store

    db = tmp_path / "sub" / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert create_sqlite_store(uri) is True
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]  # no temporary left
    assert _usable_or_absent(db.parent) == "complete"
    before = db.stat()
    assert create_sqlite_store(uri) is False  # there already: not touched
    assert db.stat().st_ino == before.st_ino and db.stat().st_mtime_ns == before.st_mtime_ns
    assert create_sqlite_store("http://127.0.0.1:1") is False
    assert create_sqlite_store(f"postgresql://u@127.0.0.1:1/{tmp_path.name}") is False


@pytest.mark.slow
def test_a_sweep_interrupted_while_it_creates_its_store_leaves_a_usable_folder(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in script_env().items() if k != "MLFLOW_TRACKING_URI"}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "client._cli", "sweep", "--trials", "2", "--epochs", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C reaches the group, as from a terminal
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(tmp_path.glob("*mlflow.db*")) and sweep.poll() is None:
            assert time.monotonic() < deadline, "the sweep made no store"
            time.sleep(0.01)
        time.sleep(0.2)  # in the middle of MLflow's migrations
        os.killpg(sweep.pid, signal.SIGINT)
        _, stderr = sweep.communicate(timeout=TIMEOUT)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert "Creating initial MLflow database tables" not in stderr
    _usable_or_absent(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} <= {"mlflow.db"}
