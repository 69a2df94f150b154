"""``max_queued`` with ``spool_dir``: what is in the write-ahead journal leaves memory, so a
client with a tiny ``max_queued`` keeps accepting calls while its store is blocked (a real
second SQLite connection holding the write lock), memory stays bounded, and once the store is
back every point is stored exactly once, in order. Without room on disk (the journal cannot
be written) the calls block and are refused as before.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from actors.spool._spool import Spool
from client import QueueingClient

MAX_QUEUED = 10
STEPS = 150  # two entities each: 30 times max_queued
RETRY = 4.0  # a call that waited for a round to end would wait this long, then be refused


@pytest.fixture(autouse=True)
def _no_keeper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNACTORS_KEEPER", "0")  # not what is tested here: no process


def _held(client: QueueingClient) -> int:
    """Entities the client holds in memory, queued or in flight, as status() says."""
    return sum(sum(run.queued.values()) for run in client.status().runs)


def _stored_steps(uri: str, run_id: str, key: str) -> list[int]:
    """The run's points of ``key`` in the order the store got them (SQLite's rowid)."""
    db = sqlite3.connect(uri.removeprefix("sqlite:///"))
    try:
        rows = db.execute(
            "SELECT step FROM metrics WHERE run_uuid = ? AND key = ? ORDER BY rowid",
            (run_id, key),
        ).fetchall()
    finally:
        db.close()
    return [step for (step,) in rows]


def test_a_full_budget_spills_to_the_journal_instead_of_blocking(
    executor: str,
    tracking_uri: str,
    experiment_id: str,
    store: MlflowClient,
    lock_store: Any,
    tmp_path: Path,
) -> None:
    client = QueueingClient(
        tracking_uri,
        executor=executor,
        max_queued=MAX_QUEUED,
        spool_dir=tmp_path / "spool",
        retry_timeout=RETRY,
        journal_interval=0.02,
    )
    try:
        pending = client.create_run(experiment_id, run_name="budget")
        client.log_params(pending, {"lr": "0.1"})
        client.flush()
        run_id = pending.resolve(timeout=5)
        budget = client._get_session().budget
        assert budget is not None
        with lock_store():  # the store is blocked until the block ends
            most, began = 0, time.monotonic()
            for step in range(STEPS):
                client.log_metrics(pending, {"loss": float(step)}, step=step)
                client.set_tags(pending, {"last": str(step)})  # only the last one, in order
                most = max(most, _held(client), budget.held)
            took = time.monotonic() - began
            assert took < RETRY, f"{STEPS} steps took {took:.1f} s: calls waited for rounds"
            assert most <= MAX_QUEUED
            deadline = time.monotonic() + 5  # all on disk: what is still queued is there too
            while client.status().runs[0].journaled["metrics"] < STEPS:
                assert time.monotonic() < deadline, client.status()
                time.sleep(0.02)
            [run] = client.status().runs
            assert run.spooled["metrics"] > 0 and run.logged["metrics"] == 0, run
        client.flush()
        [run] = client.status().runs
        # Delivered from the journal, what was still queued too is not sent (counted) again.
        assert run.logged["metrics"] == STEPS and run.logged["tags"] >= STEPS, run
        assert sum(run.spooled.values()) == 0 and sum(run.queued.values()) == 0, run
        deadline = time.monotonic() + 5  # acknowledged rows leave at the journal's next commit
        while sum(client.status().runs[0].journaled.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sum(client.status().runs[0].journaled.values()) == 0, client.status()
    finally:
        client.close()
    assert _stored_steps(tracking_uri, run_id, "loss") == list(range(STEPS))  # once, in order
    data = store.get_run(run_id).data
    assert data.tags["last"] == str(STEPS - 1) and data.params == {"lr": "0.1"}


def test_a_full_budget_still_blocks_and_refuses_when_the_journal_cannot_be_written(
    executor: str,
    tracking_uri: str,
    experiment_id: str,
    lock_store: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = QueueingClient(
        tracking_uri,
        executor=executor,
        max_queued=MAX_QUEUED,
        spool_dir=tmp_path / "spool",
        retry_timeout=1,
        journal_interval=0.02,
    )
    try:
        pending = client.create_run(experiment_id, run_name="full-disk")
        client.flush()
        run_id = pending.resolve(timeout=5)

        def full_disk(*args: Any, **kwargs: Any) -> Any:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(Spool, "commit_group", full_disk)
        with lock_store(), pytest.raises(MlflowException, match=f"max_queued={MAX_QUEUED}"):
            for step in range(STEPS):
                client.log_metrics(pending, {"loss": float(step)}, step=step)
        assert _held(client) <= MAX_QUEUED
        monkeypatch.undo()
        client.flush()
    finally:
        client.close()
    stored = _stored_steps(tracking_uri, run_id, "loss")
    assert stored == list(range(len(stored))) and MAX_QUEUED <= len(stored) < STEPS


def test_what_the_journal_delivered_is_not_sent_again_from_memory(
    executor: str, tracking_uri: str, experiment_id: str, lock_store: Any, tmp_path: Path
) -> None:
    """A run spilled, whose delivery from the journal is blocked, logs a few more points (in
    memory and, once committed, in the journal too): the delivery sends them from the journal,
    so the next round must not send (nor count) them again from memory."""
    client = QueueingClient(
        tracking_uri,
        executor=executor,
        max_queued=MAX_QUEUED,
        spool_dir=tmp_path / "spool",
        retry_timeout=RETRY,
        journal_interval=0.02,
    )
    extra = MAX_QUEUED // 2
    try:
        pending = client.create_run(experiment_id, run_name="twice")
        client.flush()
        run_id = pending.resolve(timeout=5)
        with lock_store():
            for step in range(MAX_QUEUED + 1):  # the last one spills the first ten
                client.log_metrics(pending, {"loss": float(step)}, step=step)
            deadline = time.monotonic() + 5  # their delivery from the journal is blocked
            while client.status().runs[0].worker != "spool":
                assert time.monotonic() < deadline, client.status()
                time.sleep(0.01)
            for step in range(MAX_QUEUED + 1, MAX_QUEUED + 1 + extra):
                client.log_metrics(pending, {"loss": float(step)}, step=step)
            while client.status().runs[0].journaled["metrics"] < MAX_QUEUED + 1 + extra:
                assert time.monotonic() < deadline, client.status()
                time.sleep(0.01)
        client.flush()
        [run] = client.status().runs
        assert run.logged["metrics"] == MAX_QUEUED + 1 + extra, run
    finally:
        client.close()
    assert _stored_steps(tracking_uri, run_id, "loss") == list(range(MAX_QUEUED + 1 + extra))
