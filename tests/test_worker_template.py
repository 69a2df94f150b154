"""The worker template: the process executor's workers are forks of one pre-imported process.

What it must keep of fresh interpreters: a user's unguarded ``__main__`` is never re-imported,
a worker killed with -9 costs nothing, a fork of the client's own process keeps working, no
process outlives the last executor or the program, workers start their own session and exit
when their parent's socket closes, and a template that dies is replaced.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from scripts import script_env

from actors.executors import _template
from client import QueueingClient

pytestmark = pytest.mark.slow  # each test starts worker processes or a program of its own


TIMEOUT = 120


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie has exited: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """Wait until none of ``pids`` runs; the ones still running at the deadline."""
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if running(pid)]


def template_pid() -> int | None:
    template = _template._template
    return None if template is None else template.process.pid


def flush_one(client: QueueingClient, experiment_id: str, value: float = 1.0) -> str:
    run = client.create_run(experiment_id)
    client.log_metrics(run, {"m": value})
    client.set_terminated(run)
    client.flush(synchronous=False).await_completion(TIMEOUT)
    return str(run.resolve())


def executor_of(client: QueueingClient):
    return client._session._executor


def test_an_unguarded_main_is_never_imported_again(tmp_path, tracking_uri, store, experiment_id):
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            from client import QueueingClient

            print("main ran", flush=True)
            client = QueueingClient({tracking_uri!r}, executor="process", max_workers=2)
            for i in range(3):
                run = client.create_run({experiment_id!r}, run_name=f"u{{i}}")
                client.log_metrics(run, {{"m": float(i)}})
                client.set_terminated(run)
            client.flush()
            client.close()
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("main ran") == 1, done.stdout
    runs = store.search_runs([experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["u0", "u1", "u2"]
    assert all(r.data.metrics.keys() == {"m"} for r in runs)


def test_workers_are_forks_of_the_template_in_their_own_session(tracking_uri, experiment_id):
    client = QueueingClient(tracking_uri, executor="process", max_workers=2)
    try:
        flush_one(client, experiment_id)
        template = template_pid()
        assert template is not None and running(template)
        assert os.getsid(template) == template  # a terminal's Ctrl-C reaches neither
        for pid in executor_of(client).worker_pids():
            assert parent_of(pid) == template
            assert os.getsid(pid) == pid
    finally:
        client.close()


def test_a_worker_killed_with_sigkill_is_replaced_by_a_fresh_fork(
    tracking_uri, store, experiment_id
):
    client = QueueingClient(tracking_uri, executor="process", max_workers=1)
    try:
        flush_one(client, experiment_id)
        (victim,) = executor_of(client).worker_pids()
        os.kill(victim, signal.SIGKILL)
        assert wait_gone([victim]) == []
        run_id = flush_one(client, experiment_id, 2.0)
        assert store.get_run(run_id).data.metrics == {"m": 2.0}
        (fresh,) = executor_of(client).worker_pids()
        assert fresh != victim and parent_of(fresh) == template_pid()
    finally:
        client.close()


def test_the_template_is_stopped_with_the_last_executor(tracking_uri, experiment_id):
    first = QueueingClient(tracking_uri, executor="process", max_workers=1)
    second = QueueingClient(tracking_uri, executor="process", max_workers=1)
    try:
        flush_one(first, experiment_id)
        flush_one(second, experiment_id)
        template = template_pid()
        assert template is not None
        workers = executor_of(first).worker_pids() + executor_of(second).worker_pids()
        first.close()
        assert running(template), "the template went with the first of two executors"
        assert template_pid() == template
        flush_one(second, experiment_id)  # still served
        second.close()
        assert template_pid() is None
        assert wait_gone([template, *workers], timeout=5) == []
    finally:
        first.close()
        second.close()


def test_a_template_that_died_is_replaced(tracking_uri, store, experiment_id):
    client = QueueingClient(tracking_uri, executor="process", max_workers=1)
    try:
        flush_one(client, experiment_id)
        old = template_pid()
        assert old is not None
        (worker,) = executor_of(client).worker_pids()
        os.kill(old, signal.SIGKILL)
        assert wait_gone([old]) == []
        flush_one(client, experiment_id)  # its workers live on without it
        assert executor_of(client).worker_pids() == [worker]
        os.kill(worker, signal.SIGKILL)  # the next worker needs a new template
        assert wait_gone([worker]) == []
        run_id = flush_one(client, experiment_id, 3.0)
        assert store.get_run(run_id).data.metrics == {"m": 3.0}
        new = template_pid()
        assert new is not None and new != old
        (fresh,) = executor_of(client).worker_pids()
        assert parent_of(fresh) == new
    finally:
        client.close()


FORK_SCRIPT = """
import os, sys
from actors.executors import _template
from client import QueueingClient

uri, experiment_id = sys.argv[1], sys.argv[2]
client = QueueingClient(uri, executor="process", max_workers=1)

def log(name):
    run = client.create_run(experiment_id, run_name=name)
    client.log_metrics(run, {"m": 1.0})
    client.set_terminated(run)
    client.flush()

log("before")
pid = os.fork()
if pid == 0:
    try:
        log("child")
        child_template = _template._template.process.pid
        client.close()
        # The child's own template goes with the child's last executor.
        if _template._template is not None or os.path.exists(f"/proc/{child_template}"):
            print("child's template left running", flush=True)
            os._exit(2)
    except BaseException as exc:
        print("child failed", repr(exc), flush=True)
        os._exit(1)
    os._exit(0)
log("parent")
_, status = os.waitpid(pid, 0)
client.close()
print("child exit", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_a_fork_of_the_clients_process_keeps_working_in_both(
    tmp_path: Path, tracking_uri, store, experiment_id
):
    done = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, tracking_uri, experiment_id],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert "child exit 0" in done.stdout, done.stdout + done.stderr
    names = sorted(r.info.run_name for r in store.search_runs([experiment_id]))
    assert names == ["before", "child", "parent"]


EXIT_SCRIPT = """
import os, sys
from actors.executors import _template
from client import QueueingClient

client = QueueingClient(sys.argv[1], executor="process", max_workers=2)
run = client.create_run(sys.argv[2])
client.log_metrics(run, {"m": 1.0})
client.flush()
pids = [_template._template.process.pid, *client._session._executor.worker_pids()]
print(*pids, flush=True)
if sys.argv[3] == "kill":
    import time
    time.sleep(600)
"""


@pytest.mark.parametrize("ending", ["exit", "kill"])
def test_no_process_outlives_the_program(tracking_uri, experiment_id, ending):
    process = subprocess.Popen(
        [sys.executable, "-c", EXIT_SCRIPT, tracking_uri, experiment_id, ending],
        env=script_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        pids = [int(p) for p in process.stdout.readline().split()]
        assert len(pids) >= 2, pids
        if ending == "kill":  # no at-exit handler: the closed sockets alone end them
            process.kill()
        assert process.wait(TIMEOUT) == (0 if ending == "exit" else -signal.SIGKILL)
        assert wait_gone(pids) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_worker_writes_where_its_parent_writes_now(tmp_path: Path) -> None:
    """A worker forked after the parent moved its stderr (a log file reopened, a test's
    capture) writes there, as a fresh interpreter started then would, not where stderr was
    when the template started. A worker's warning here: the SQL fast path's fallback."""
    from scripts import run_script

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    moved = tmp_path / "moved-stderr.log"
    result = run_script(
        f"""
        import os
        import sqlalchemy
        from mlflow import MlflowClient
        from client import QueueingClient

        uri = {uri!r}
        experiment_id = MlflowClient(uri).create_experiment("moved")
        first = QueueingClient(uri, executor="process", max_workers=1)
        first.create_run(experiment_id)
        first.flush()  # the template is up, with this process's stderr of now
        fd = os.open({str(moved)!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        client = QueueingClient(uri, executor="process", max_workers=1)
        run = client.create_run(experiment_id)
        client.flush()  # a new worker, forked after the move, has its store open
        engine = sqlalchemy.create_engine(uri)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")
        engine.dispose()
        client.log_metrics(run, {{"loss": 0.5}}, step=0)
        client.flush()  # the worker warns that the fast path is unavailable
        client.close()
        first.close()
        """,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "SQL fast path unavailable" in moved.read_text()
    assert "SQL fast path unavailable" not in result.stderr
