"""``runactors replay`` end to end, as a separate process, against real stores.

Journals are written with :class:`actors.spool._spool.Spool` (as a live client would leave them),
delivered by ``python -m client._cli replay`` into a real SQLite store or a real
``mlflow server`` on loopback, and the store is read back: every run once, every point once.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.entities import Dataset, DatasetInput, Metric, Param, RunTag, ViewType
from mlflow.tracking import MlflowClient
from scripts import script_env
from stores import SqliteLock

from actors.delivery._create_key import CREATE_KEY_TAG, find_created_run
from actors.queueing._plan import LogBatchCall, SetTerminatedCall
from actors.queueing._queues import CreateRunCall
from actors.spool._spool import Spool

pytestmark = pytest.mark.slow  # most tests run `runactors replay` or a killed client as processes


ENV = script_env(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
START = 1_700_000_000_000
TAGS = [("team", "vision")]


def replay_command(folder: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "client._cli", "replay", str(folder), *args]


def replay(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        replay_command(folder, *args), env=ENV, capture_output=True, text=True, timeout=600
    )


def start_replay(folder: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        replay_command(folder, *args),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_progress(proc: subprocess.Popen[str], lines: int = 1) -> str:
    """Read the replay's stderr until its ``lines``-th progress line (one at the first call
    delivered, then one every tenth of the journal)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "calls delivered" in line:
            lines -= 1
            if lines == 0:
                return line
    proc.wait(timeout=60)
    raise AssertionError(f"no progress before exit {proc.returncode}:\n{''.join(seen)}")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=60)


def run_calls(batches: int, per_batch: int) -> list:
    """Params and tags, ``batches`` batches of ``per_batch`` loss points, termination."""
    calls: list = [LogBatchCall([], [("lr", "0.01"), ("layers", "3")], [("phase", "train")])]
    for b in range(batches):
        steps = range(b * per_batch, (b + 1) * per_batch)
        rows = [("loss", 1 / (s + 1), START + s, s, None, None, None) for s in steps]
        calls.append(LogBatchCall(rows, [], []))
    calls.append(SetTerminatedCall("FINISHED", START + 10**6))
    return calls


def write_journal(
    folder: Path,
    uri: str,
    experiment_id: str,
    *,
    batches: int = 3,
    per_batch: int = 10,
    key: str = "pending-1-1",
    create_attempted: bool = False,
    spool: Spool | None = None,
) -> Path:
    """A journal as a client that lost its store would leave it: the creation and all."""
    own = spool is None
    spool = spool or Spool.create(folder, uri)
    spool.add_run(
        key,
        create=CreateRunCall(experiment_id, START, TAGS, f"trial-{key}"),
        create_key=str(uuid.uuid4()),
        create_attempted=create_attempted,
        calls=run_calls(batches, per_batch),
    )
    if own:
        spool.close()
    return spool.path


def runs_of(store: MlflowClient, experiment_id: str) -> list:
    return store.search_runs([experiment_id], run_view_type=ViewType.ALL)


def assert_delivered_once(store: MlflowClient, run_id: str, points: int) -> None:
    history = store.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(points))  # every point exactly once
    run = store.get_run(run_id)
    assert run.data.params == {"lr": "0.01", "layers": "3"}
    assert run.data.tags["phase"] == "train" and run.data.tags["team"] == "vision"
    assert run.info.status == "FINISHED" and run.info.end_time == START + 10**6


# -- SQLite store -------------------------------------------------------------------------------


def test_replay_delivers_everything_once_and_removes_the_journal(
    tmp_path: Path, tracking_uri: str, store: MlflowClient, experiment_id: str
) -> None:
    folder = tmp_path / "spool"
    write_journal(folder, tracking_uri, experiment_id)
    done = replay(folder)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "delivered" in done.stdout and "30 metrics, 2 params, 2 tags" in done.stdout
    assert list(folder.iterdir()) == []
    (run,) = runs_of(store, experiment_id)
    assert run.info.run_name == "trial-pending-1-1" and run.info.start_time == START
    assert CREATE_KEY_TAG not in run.data.tags  # a local store gets no extra tag
    assert_delivered_once(store, run.info.run_id, 30)

    again = replay(folder)  # safe to run twice: nothing to do
    assert again.returncode == 0, again.stderr
    assert "Nothing to replay" in again.stdout
    assert len(runs_of(store, experiment_id)) == 1


def test_replay_killed_midway_and_rerun_stores_everything_exactly_once(
    tmp_path: Path, tracking_uri: str, store: MlflowClient, experiment_id: str
) -> None:
    folder = tmp_path / "spool"
    write_journal(folder, tracking_uri, experiment_id, batches=300, per_batch=20)
    for lines in (1, 3):  # SIGKILL at the first call, then about a fifth further on
        proc = start_replay(folder)
        try:
            wait_for_progress(proc, lines)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            stop(proc)
        assert proc.returncode == -signal.SIGKILL
    done = replay(folder)
    assert done.returncode == 0, done.stderr + done.stdout
    assert list(folder.iterdir()) == []
    (run,) = runs_of(store, experiment_id)
    assert_delivered_once(store, run.info.run_id, 6000)


def test_two_replays_at_once_deliver_once(
    tmp_path: Path,
    tracking_uri: str,
    store: MlflowClient,
    experiment_id: str,
    lock_store: Callable[..., SqliteLock],
) -> None:
    folder = tmp_path / "spool"
    write_journal(folder, tracking_uri, experiment_id, batches=100, per_batch=10)
    first = start_replay(folder, "--retry-timeout", "600")
    try:
        wait_for_progress(first)
        # Hold the store so the first replay waits mid-journal (retrying "database is
        # locked") while the second one starts: the first keeps its journal locked.
        with lock_store():
            second = replay(folder)
        out, err = first.communicate(timeout=600)
    finally:
        stop(first)
    assert second.returncode == 1, second.stderr + second.stdout
    assert "in use by a live client or another replay; left for later" in second.stderr
    assert "locked" in second.stdout
    assert first.returncode == 0, err + out
    assert list(folder.iterdir()) == []
    (run,) = runs_of(store, experiment_id)
    assert_delivered_once(store, run.info.run_id, 1000)


def test_a_journal_of_a_live_client_is_left_alone(
    tmp_path: Path, tracking_uri: str, store: MlflowClient, experiment_id: str
) -> None:
    folder = tmp_path / "spool"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from actors.spool._spool import Spool
                from actors.queueing._queues import CreateRunCall
                spool = Spool.create({str(folder)!r}, {tracking_uri!r})
                spool.add_run("p", create=CreateRunCall({experiment_id!r}, 1, [], "live"))
                print(spool.path, flush=True)
                time.sleep(600)
                """
            ),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        path = Path(holder.stdout.readline().strip())
        locked = replay(folder)
        assert locked.returncode == 1
        assert f"{path.name}: in use by a live client or another replay" in locked.stderr
        assert path.exists() and runs_of(store, experiment_id) == []
        holder.kill()  # the process dies: its journal is now a dead process's leftover
        holder.wait(timeout=60)
    finally:
        stop(holder)
    done = replay(folder)
    assert done.returncode == 0, done.stderr
    assert [r.info.run_name for r in runs_of(store, experiment_id)] == ["live"]


def test_a_creation_of_unknown_outcome_that_landed_makes_no_second_run(
    tmp_path: Path, tracking_uri: str, store: MlflowClient, experiment_id: str
) -> None:
    # The process sent the creation, the run was made, and the process died before it
    # could record the run's ID.
    made = store.create_run(
        experiment_id, start_time=START, tags=dict(TAGS), run_name="trial-pending-1-1"
    )
    folder = tmp_path / "spool"
    write_journal(folder, tracking_uri, experiment_id, create_attempted=True)
    done = replay(folder)
    assert done.returncode == 0, done.stderr + done.stdout
    (run,) = runs_of(store, experiment_id)
    assert run.info.run_id == made.info.run_id
    assert_delivered_once(store, run.info.run_id, 30)


def test_a_look_alike_run_with_data_is_not_taken_for_the_creation(
    tmp_path: Path, tracking_uri: str, store: MlflowClient, experiment_id: str
) -> None:
    other = store.create_run(
        experiment_id, start_time=START, tags=dict(TAGS), run_name="trial-pending-1-1"
    )
    store.log_param(other.info.run_id, "lr", "0.5")  # someone else's run, already in use
    folder = tmp_path / "spool"
    write_journal(folder, tracking_uri, experiment_id, create_attempted=True)
    done = replay(folder)
    assert done.returncode == 0, done.stderr + done.stdout
    runs = {r.info.run_id: r for r in runs_of(store, experiment_id)}
    assert len(runs) == 2 and store.get_run(other.info.run_id).data.params == {"lr": "0.5"}
    (ours,) = set(runs) - {other.info.run_id}
    assert_delivered_once(store, ours, 30)


def test_a_permanent_error_leaves_that_runs_calls_and_exits_1(
    tmp_path: Path, tracking_uri: str, store: MlflowClient, experiment_id: str
) -> None:
    folder = tmp_path / "spool"
    spool = Spool.create(folder, tracking_uri)
    write_journal(folder, tracking_uri, "987654", key="pending-1-1", spool=spool)
    path = write_journal(folder, tracking_uri, experiment_id, key="pending-1-2", spool=spool)
    spool.close()
    for _ in range(2):  # and again: the good run is not delivered twice
        done = replay(folder)
        assert done.returncode == 1, done.stderr + done.stdout
        assert "run pending-1-1: create_run failed" in done.stdout
        assert "No Experiment with id=987654 exists" in done.stdout
        (run,) = runs_of(store, experiment_id)
        assert_delivered_once(store, run.info.run_id, 30)
    with Spool.open(path) as left:
        assert [entry.key for entry in left.runs()] == ["pending-1-1"]
        assert len(left.calls("pending-1-1")) == len(run_calls(3, 10))


def test_bad_folders_and_files_are_clear_one_line_errors(
    tmp_path: Path, tracking_uri: str, store: MlflowClient, experiment_id: str
) -> None:
    missing = replay(tmp_path / "nowhere")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"Error: spool folder {tmp_path / 'nowhere'} does not exist"

    folder = tmp_path / "spool"
    write_journal(folder, tracking_uri, experiment_id)
    (folder / "notes.txt").write_text("mine")
    only_foreign = tmp_path / "foreign"
    only_foreign.mkdir()
    (only_foreign / "notes.txt").write_text("mine")
    done = replay(only_foreign)
    assert done.returncode == 0, done.stderr
    assert "notes.txt: not a runactors journal; left alone" in done.stderr

    garbage = folder / "runactors-0000.spool"
    garbage.write_bytes(b"garbage" * 100)
    newer = write_journal(folder, tracking_uri, experiment_id, key="pending-9-9")
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version=7")
    db.close()
    done = replay(folder)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert "runactors replay: notes.txt: not a runactors journal; left alone" in lines
    assert (
        f"runactors replay: {garbage.name}: {garbage} is not a runactors journal "
        "(not an SQLite file, or cut short)." in lines
    )
    assert any(f"{newer.name} has format version 7" in line for line in lines)
    # the good journal was delivered; nothing else was touched
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["notes.txt", garbage.name, newer.name]
    )
    assert garbage.read_bytes() == b"garbage" * 100
    (run,) = runs_of(store, experiment_id)
    assert_delivered_once(store, run.info.run_id, 30)


def send_everything_twice(client: MlflowClient, experiment_id: str) -> str:
    """What a replay killed between a call and its row's removal does: the call again."""
    run_id = client.create_run(experiment_id).info.run_id
    points = [Metric("loss", 1 / (s + 1), START + s, s) for s in range(50)]
    points += [Metric("loss", float("nan"), START, 99), Metric("loss", math.inf, START, 98)]
    data = DatasetInput(Dataset("digits", "d1g3st", "local", "{}"), [])
    for _ in range(2):
        client.log_batch(
            run_id, metrics=points, params=[Param("lr", "0.01")], tags=[RunTag("t", "v")]
        )
        client.log_inputs(run_id, [data])
        client.set_terminated(run_id, "FINISHED", START + 7)
    return run_id


def assert_stored_once(client: MlflowClient, run_id: str) -> None:
    assert len(client.get_metric_history(run_id, "loss")) == 52
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.01"} and run.data.tags["t"] == "v"
    assert len(run.inputs.dataset_inputs) == 1
    assert (run.info.status, run.info.end_time) == ("FINISHED", START + 7)


def test_calls_sent_again_store_nothing_twice_in_sqlite(
    store: MlflowClient, experiment_id: str
) -> None:
    assert_stored_once(store, send_everything_twice(store, experiment_id))


# -- a real tracking server ---------------------------------------------------------------------


@pytest.fixture
def server_experiment(mlflow_server_uri: str) -> str:
    return MlflowClient(mlflow_server_uri).create_experiment(f"replay-{uuid.uuid4().hex}")


@pytest.mark.slow
def test_replay_to_a_server_tags_the_creation_and_delivers_once(
    tmp_path: Path, mlflow_server_uri: str, server_experiment: str
) -> None:
    folder = tmp_path / "spool"
    path = write_journal(folder, mlflow_server_uri, server_experiment)
    with Spool.open(path) as spool:
        (entry,) = spool.runs()
    done = replay(folder)
    assert done.returncode == 0, done.stderr + done.stdout
    # Only replay's own lines: not MLflow's "View run ... at: ..." per terminated run.
    assert "View run" not in done.stdout + done.stderr, done.stdout
    remote = MlflowClient(mlflow_server_uri)
    (run,) = runs_of(remote, server_experiment)
    assert run.data.tags[CREATE_KEY_TAG] == entry.create_key
    assert_delivered_once(remote, run.info.run_id, 30)
    assert replay(folder).returncode == 0
    assert len(runs_of(remote, server_experiment)) == 1


@pytest.mark.slow
def test_a_server_creation_of_unknown_outcome_is_found_by_its_key(
    tmp_path: Path, mlflow_server_uri: str, server_experiment: str
) -> None:
    remote = MlflowClient(mlflow_server_uri)
    folder = tmp_path / "spool"
    path = write_journal(folder, mlflow_server_uri, server_experiment, create_attempted=True)
    with Spool.open(path) as spool:
        (entry,) = spool.runs()
    assert find_created_run(remote, mlflow_server_uri, entry.create, entry.create_key) is None
    # The creation landed (through whatever path); only its key ties it to the journal.
    made = remote.create_run(
        server_experiment, start_time=START + 5, tags={CREATE_KEY_TAG: entry.create_key}
    )
    assert (
        find_created_run(remote, mlflow_server_uri, entry.create, entry.create_key)
        == made.info.run_id
    )
    done = replay(folder)
    assert done.returncode == 0, done.stderr + done.stdout
    (run,) = runs_of(remote, server_experiment)
    assert run.info.run_id == made.info.run_id
    history = remote.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(30))


@pytest.mark.slow
def test_calls_sent_again_store_nothing_twice_on_a_server(
    mlflow_server_uri: str, server_experiment: str
) -> None:
    remote = MlflowClient(mlflow_server_uri)
    assert_stored_once(remote, send_everything_twice(remote, server_experiment))


def test_an_unreachable_store_keeps_the_journal_with_a_clear_error(
    tmp_path: Path,
    tracking_uri: str,
    store: MlflowClient,
    experiment_id: str,
    lock_store: Callable[..., SqliteLock],
) -> None:
    folder = tmp_path / "spool"
    path = write_journal(folder, tracking_uri, experiment_id)
    before = path.read_bytes()
    # The store stays locked past --retry-timeout: even opening it fails.
    with lock_store():
        locked = replay(folder, "--retry-timeout", "2")
    assert locked.returncode == 1, locked.stderr + locked.stdout
    assert "Traceback" not in locked.stderr
    assert f"{path.name}: tracking store {tracking_uri} unavailable" in locked.stdout
    assert "database is locked" in locked.stdout
    assert path.read_bytes() == before and runs_of(store, experiment_id) == []

    unknown = replay(folder, "--tracking-uri", "nosuchscheme://x")
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "tracking store nosuchscheme://x unavailable" in unknown.stdout

    done = replay(folder)  # the store is back
    assert done.returncode == 0, done.stderr + done.stdout
    (run,) = runs_of(store, experiment_id)
    assert_delivered_once(store, run.info.run_id, 30)


# -- a journal damaged on disk ------------------------------------------------------------------

SPOOL_THEN_DIE = """
    import os, signal, sys
    from client import QueueingClient

    uri, experiment_id, spool_dir = sys.argv[1:4]
    client = QueueingClient(uri, retry_timeout=0, spool_dir=spool_dir, journal_interval=60)
    run = client.create_run(experiment_id, run_name="damaged")
    for chunk in range(20):  # 20 flushes that fail: 20 appends to the journal
        for step in range(chunk * 1000, (chunk + 1) * 1000):
            client.log_metrics(run, {"loss": 1 / (step + 1)}, step=step)
        try:
            client.flush()
        except Exception:
            pass  # the store is down: the batch is spooled
    print(len(os.listdir(spool_dir)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no exit: the -wal is not checkpointed
"""


def files_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_a_journal_with_a_damaged_wal_is_refused_untouched_with_its_loss_named(
    tmp_path: Path, tracking_uri: str, store: MlflowClient, experiment_id: str
) -> None:
    folder = tmp_path / "spool"
    # The store is down: a port bound by this test, not listening, refuses every connection.
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{down.getsockname()[1]}"
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(SPOOL_THEN_DIE),
                uri,
                experiment_id,
                str(folder),
            ],
            env={**ENV, "RUNACTORS_KEEPER": "0"},  # no keeper to deliver (and checkpoint) it
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert child.returncode == -signal.SIGKILL, child.stderr
    (journal,) = folder.glob("*.spool")
    wal = Path(f"{journal}-wal")
    assert wal.stat().st_size > 100_000  # 20 appends, all in the -wal
    intact = tmp_path / "intact"
    shutil.copytree(folder, intact)

    data = bytearray(wal.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped in the middle of the -wal
    wal.write_bytes(bytes(data))
    before = files_digest(folder)
    done = replay(folder, "--tracking-uri", tracking_uri)
    assert done.returncode == 1, done.stderr + done.stdout
    assert files_digest(folder) == before  # journal, -wal and -shm as they were
    assert "unreadable" in done.stdout and "│ delivered" not in done.stdout  # its status
    assert "calls delivered" not in done.stderr  # no progress line either
    message = " ".join(done.stderr.split())
    assert f"{journal.name} is damaged: its -wal file is damaged at byte" in message
    assert "Its header promises 1 runs, 20 calls (20000 metrics)" in message
    assert "what can be read holds 1 runs," in message and "lost: 0 runs," in message
    assert runs_of(store, experiment_id) == []  # nothing delivered, nothing claimed

    done = replay(intact, "--tracking-uri", tracking_uri)  # the same journal, undamaged
    assert done.returncode == 0, done.stderr + done.stdout
    assert "20000 metrics" in done.stdout and list(intact.iterdir()) == []
    (run,) = runs_of(store, experiment_id)
    history = store.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(20_000))
