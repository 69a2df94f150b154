"""The spool journal on real files: round trips, modes, versions, damage, locks, durability."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from scripts import script_env

from actors.delivery._jobs import call_counts
from actors.queueing._plan import LogBatchCall, LogInputsCall, SetTerminatedCall
from actors.queueing._queues import CreateRunCall
from actors.spool._files import spool_files
from actors.spool._format import SpoolCorrupt, SpoolLocked, SpoolVersion
from actors.spool._spool import Spool

URI = "sqlite:///nowhere.db"
CREATE = CreateRunCall("1", 1_700_000_000_000, [("team", "vision")], "trial-1")


def dataset(name: str = "digits") -> DatasetInput:
    return DatasetInput(
        Dataset(name, "d1g3st", "local", '{"uri": "/data/digits"}', schema='{"a": 1}'),
        [InputTag("mlflow.data.context", "training")],
    )


def bits(value: object) -> object:
    """A float by its bits (NaN equal to NaN, -0.0 unequal to 0.0); anything else as is."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else struct.pack(">d", value)
    return (type(value), value)


def same_rows(a: list, b: list) -> bool:
    return [tuple(bits(v) for v in row) for row in a] == [tuple(bits(v) for v in row) for row in b]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def child(code: str) -> subprocess.Popen[str]:
    """A Python process with this worktree's packages, running ``code``."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    created = Spool.create(tmp_path / "spool", URI)
    yield created
    created.close()


# -- round trips --------------------------------------------------------------------------------


def test_every_call_kind_round_trips(spool: Spool) -> None:
    batch = LogBatchCall(
        [("loss", 0.5, 1000, 1, "m-1", "digits", "d1g3st"), ("acc", 1, 1000, 1, None, None, None)],
        [("lr", "0.01")],
        [("note", "ü ✓")],
    )
    inputs = LogInputsCall([dataset("a"), dataset("b")])
    end = SetTerminatedCall("FINISHED", 1_700_000_100_000)
    entry = spool.add_run("pending-1-1", create=CREATE, calls=[batch, inputs])
    spool.append("pending-1-1", [end])
    spool.add_run("run-2", run_id="a" * 32, calls=[SetTerminatedCall(None, None)])

    assert entry.create == CREATE and entry.create_key and not entry.create_attempted
    calls = spool.calls("pending-1-1")
    assert [seq for seq, _ in calls] == sorted(seq for seq, _ in calls)
    got_batch, got_inputs, got_end = (call for _, call in calls)
    assert got_batch == batch and got_end == end
    assert [d.to_dictionary() for d in got_inputs.datasets] == [
        d.to_dictionary() for d in inputs.datasets
    ]
    assert spool.run("pending-1-1") == entry
    assert [r.key for r in spool.runs()] == ["pending-1-1", "run-2"]
    assert spool.calls("run-2") == [(calls[-1][0] + 1, SetTerminatedCall(None, None))]
    expected = {k: call_counts(batch)[k] + call_counts(inputs)[k] for k in call_counts(batch)}
    expected["tags"] += len(CREATE.tags)  # tags riding on the creation are spooled too
    assert spool.counts("pending-1-1") == expected
    assert spool.counts() == expected
    assert spool.pending_calls() == 5  # creation + 3 calls + 1


def test_a_creation_without_start_time_gets_one(spool: Spool) -> None:
    entry = spool.add_run("p", create=CREATE._replace(start_time=None))
    assert isinstance(entry.create.start_time, int) and entry.create.start_time > 1.7e12
    assert spool.run("p").create == entry.create


def test_numpy_scalars_become_python_numbers(spool: Spool) -> None:
    rows = [
        ("f32", np.float32(1.5), 1, 0, None, None, None),
        ("f64", np.float64("nan"), 1, 0, None, None, None),
        ("i64", np.int64(-7), np.int64(3), np.int32(2), None, None, None),
        ("b", np.bool_(True), 1, 0, None, None, None),
    ]
    spool.add_run("p", run_id="r", calls=[LogBatchCall(rows, [], [])])
    ((_, call),) = spool.calls("p")
    assert same_rows(
        call.metrics,
        [
            ("f32", 1.5, 1, 0, None, None, None),
            ("f64", math.nan, 1, 0, None, None, None),
            ("i64", -7, 3, 2, None, None, None),
            ("b", True, 1, 0, None, None, None),
        ],
    )


values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1.7976931348623157e308]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
texts = st.text(min_size=1, max_size=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    metrics=st.lists(
        st.tuples(texts, values, st.integers(0, 2**62), st.integers(-(2**62), 2**62)),
        max_size=8,
    ),
    params=st.lists(st.tuples(texts, st.text(max_size=50)), max_size=5),
    tags=st.lists(st.tuples(texts, st.text(max_size=50)), max_size=5),
    name=st.none() | texts,
)
def test_round_trip_is_exact_for_any_values(metrics, params, tags, name) -> None:
    with tempfile.TemporaryDirectory() as folder:
        spool = Spool.create(folder, URI)
        try:
            rows = [(k, v, ts, step, None, None, None) for k, v, ts, step in metrics]
            create = CreateRunCall("0", 5, tags, name)
            spool.add_run("k", create=create, calls=[LogBatchCall(rows, params, tags)])
            ((_, call),) = spool.calls("k")
            assert same_rows(call.metrics, rows)
            assert call.params == params and call.tags == tags
            assert spool.run("k").create == create
        finally:
            spool.close()


def test_bad_use_is_a_clear_mlflow_exception(spool: Spool) -> None:
    with pytest.raises(MlflowException, match="exactly one of run_id and create"):
        spool.add_run("p", run_id="r", create=CREATE)
    with pytest.raises(MlflowException, match="exactly one of run_id and create"):
        spool.add_run("p")
    spool.add_run("p", run_id="r")
    with pytest.raises(MlflowException, match="already in journal"):
        spool.add_run("p", run_id="r")
    with pytest.raises(MlflowException, match="not in journal"):
        spool.append("q", [SetTerminatedCall(None, None)])
    with pytest.raises(MlflowException, match="add_run"):
        spool.append("p", [CREATE])
    with pytest.raises(MlflowException, match="DatasetInput"):
        spool.append("p", [LogInputsCall([object()])])
    assert spool.calls("p") == []  # nothing of a refused call was written


def test_remove_and_mark_created_prune_delivered_runs(spool: Spool) -> None:
    spool.add_run("p", create=CREATE, calls=[SetTerminatedCall("FINISHED", 1)])
    spool.add_run("q", create=CREATE)
    spool.mark_create_attempted("p")
    assert spool.run("p").create_attempted
    spool.mark_created("p", "run-p")
    assert spool.run("p").run_id == "run-p"  # still has a call
    spool.mark_created("q", "run-q")
    assert spool.run("q") is None  # nothing left to deliver
    spool.remove([seq for seq, _ in spool.calls("p")])
    assert spool.runs() == [] and spool.is_empty()


# -- files ------------------------------------------------------------------------------------


def test_new_folder_is_private_and_files_are_0600(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "spool"
    old = os.umask(0o022)
    try:
        spool = Spool.create(folder, URI)
    finally:
        os.umask(old)
    try:
        spool.add_run("p", create=CREATE)  # the WAL and SHM files exist now
        assert folder.stat().st_mode & 0o777 == 0o700
        files = sorted(folder.iterdir())
        assert {p.name.removeprefix(spool.path.name) for p in files} == {"", "-wal", "-shm"}
        for path in files:
            assert path.stat().st_mode & 0o777 == 0o600, path
        db = spool._db
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        spool.close()


def test_existing_open_folder_is_kept_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="runactors.spool"):
        spool = Spool.create(folder, URI)
    spool.close()
    assert folder.stat().st_mode & 0o777 == 0o755
    assert "accessible to other users (mode 755)" in caplog.text


def test_close_deletes_an_empty_journal_and_keeps_a_full_one(tmp_path: Path) -> None:
    empty = Spool.create(tmp_path, URI)
    empty.add_run("p", run_id="r", calls=[SetTerminatedCall(None, None)])
    empty.remove([seq for seq, _ in empty.calls("p")])
    assert empty.close() is True
    full = Spool.create(tmp_path, URI)
    full.add_run("p", run_id="r", calls=[SetTerminatedCall(None, None)])
    assert full.close() is False
    assert [p.name for p in tmp_path.iterdir()] == [full.path.name]
    with Spool.open(full.path) as again:
        assert again.calls("p")[0][1] == SetTerminatedCall(None, None)
        assert again.tracking_uri == URI
        assert again.meta()["pid"] == str(os.getpid())


def test_spool_files_lists_journals_only(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, URI)
    spool.add_run("p", run_id="r", calls=[SetTerminatedCall(None, None)])
    for name in ("notes.txt", "mlflow.db", "runactors-x.spool.bak", "runactors-y.spool-new"):
        (tmp_path / name).write_text("foreign")
    (tmp_path / "runactors-dir.spool").mkdir()
    assert spool_files(tmp_path) == [spool.path]
    spool.close()


# -- versions and damage ----------------------------------------------------------------------


def full_journal(folder: Path) -> Path:
    spool = Spool.create(folder, URI)
    spool.add_run("p", create=CREATE, calls=[LogBatchCall([], [("k", "v" * 3000)], [])] * 20)
    spool.close()
    return spool.path


def test_other_format_version_is_refused_untouched(tmp_path: Path) -> None:
    path = full_journal(tmp_path)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=7")
    db.close()
    before = digest(path)
    with pytest.raises(
        SpoolVersion, match=rf"{path.name} has format version 7; .* reads versions 1 to 2"
    ):
        Spool.open(path)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_version_1_journal_without_totals_is_still_read(tmp_path: Path) -> None:
    path = full_journal(tmp_path)
    with sqlite3.connect(path) as db:  # what version 1 wrote: no totals row, no triggers
        for trigger in ("runs_in", "runs_out", "calls_in", "calls_out"):
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP TABLE totals")
        db.execute("PRAGMA user_version=1")
    db.close()
    with Spool.open(path) as spool:
        assert len(spool.calls("p")) == 20


def test_rows_that_disagree_with_the_totals_are_refused(tmp_path: Path) -> None:
    path = full_journal(tmp_path)
    with Spool.open(path) as spool:  # the totals follow every write and delete
        assert spool._db.execute("SELECT runs, calls, params FROM totals").fetchone() == (1, 20, 20)
        spool.remove([seq for seq, _ in spool.calls("p", limit=5)])
        assert spool._db.execute("SELECT runs, calls, params FROM totals").fetchone() == (1, 15, 15)
    with sqlite3.connect(path) as db:  # rows lost behind the totals' back
        db.execute("DROP TRIGGER calls_out")
        db.execute("DELETE FROM calls WHERE seq > 10")
    db.close()
    with pytest.raises(
        SpoolCorrupt,
        match=r"header promises 1 runs, 15 calls \(15 params\); what can be read holds "
        r"1 runs, 5 calls \(5 params\)",
    ):
        Spool.open(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(b"not a database at all\n" * 20), "not a runactors journal"),
        (lambda p: p.write_bytes(b""), "not a runactors journal"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:50]), "not a runactors journal"),
    ],
    ids=["garbage", "empty", "truncated", "cut-in-header"],
)
def test_damaged_journal_is_refused_untouched(tmp_path: Path, damage, message) -> None:
    path = full_journal(tmp_path)
    damage(path)
    before = digest(path)
    with pytest.raises(SpoolCorrupt, match=message) as caught:
        Spool.open(path)
    assert path.name in str(caught.value)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_corrupt_page_is_refused(tmp_path: Path) -> None:
    path = full_journal(tmp_path)
    data = bytearray(path.read_bytes())
    page = struct.unpack(">H", data[16:18])[0]
    data[page + 10 : page * 2] = b"\xff" * (page - 10)  # scribble over the second page
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt, match=f"{path.name} is corrupt"):
        Spool.open(path)


def test_a_foreign_sqlite_database_with_a_journal_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runactors-0123.spool"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    before = digest(path)
    with pytest.raises(SpoolCorrupt, match="an SQLite database but not a runactors journal"):
        Spool.open(path)
    assert digest(path) == before


# -- locks and crashes ------------------------------------------------------------------------


HOLD = """
    import time
    from actors.spool._spool import Spool
    from actors.queueing._plan import SetTerminatedCall
    spool = Spool.create({folder!r}, "sqlite:///x.db")
    spool.add_run("p", run_id="r", calls=[SetTerminatedCall("FINISHED", 1)])
    print(spool.path, flush=True)
    time.sleep(600)
"""


def test_a_journal_held_by_a_live_process_is_locked_until_it_dies(tmp_path: Path) -> None:
    holder = child(HOLD.format(folder=str(tmp_path)))
    try:
        path = Path(holder.stdout.readline().strip())
        assert path.name, holder.stderr.read()
        with pytest.raises(SpoolLocked, match=f"{path.name} is locked by another process"):
            Spool.open(path)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
        holder.stderr.close()
    with Spool.open(path) as spool:  # the OS dropped the lock with the process
        assert spool.calls("p")[0][1] == SetTerminatedCall("FINISHED", 1)


APPEND_THEN_DIE = """
    import os, signal
    from actors.spool._spool import Spool
    from actors.queueing._plan import LogBatchCall
    spool = Spool.create({folder!r}, "sqlite:///x.db")
    spool.add_run("p", run_id="r")
    for n in range({appends}):
        spool.append("p", [LogBatchCall([("m", float(n), 1, n, None, None, None)], [], [])])
    print(spool.path, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # right after append returned: no close, no exit
"""


def killed_after_appends(folder: Path, appends: int) -> Path:
    proc = child(APPEND_THEN_DIE.format(folder=str(folder), appends=appends))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    return Path(out.strip())


def test_append_is_durable_when_the_process_is_killed_right_after(tmp_path: Path) -> None:
    path = killed_after_appends(tmp_path, 3)
    assert Path(f"{path}-wal").exists()  # the rows are in the WAL, never checkpointed
    with Spool.open(path) as spool:
        steps = [call.metrics[0][3] for _, call in spool.calls("p")]
    assert steps == [0, 1, 2]


def test_a_torn_last_append_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    path = killed_after_appends(tmp_path, 3)
    wal = Path(f"{path}-wal")
    wal.write_bytes(wal.read_bytes()[:-100])  # cut into the last transaction's commit frame
    with Spool.open(path) as spool:
        steps = [call.metrics[0][3] for _, call in spool.calls("p")]
    assert steps == [0, 1]


def test_a_fork_child_neither_uses_nor_holds_the_parents_journal(spool: Spool) -> None:
    spool.add_run("p", run_id="r")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 0
        try:
            spool.append("p", [SetTerminatedCall(None, None)])
            code = 1
        except MlflowException:
            pass
        try:
            Spool.open(spool.path)
            code = 2
        except SpoolLocked:
            pass
        os.close(read)
        os.write(write, b"x")
        os._exit(code)
    os.close(write)
    os.read(read, 1)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    spool.append("p", [SetTerminatedCall(None, None)])  # the parent's journal still works
    with pytest.raises(SpoolLocked):
        Spool.open(spool.path)  # and is still locked by the parent


def test_a_flipped_byte_mid_wal_is_refused_untouched_naming_the_loss(tmp_path: Path) -> None:
    path = killed_after_appends(tmp_path, 9)
    wal = Path(f"{path}-wal")
    data = bytearray(wal.read_bytes())
    data[len(data) // 2] ^= 0x01  # SQLite's recovery would stop here and drop the rest
    wal.write_bytes(bytes(data))
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    with pytest.raises(SpoolCorrupt, match="its -wal file is damaged at byte") as caught:
        Spool.open(path)
    assert "Its header promises 1 runs, 9 calls (9 metrics)" in caught.value.message
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before
