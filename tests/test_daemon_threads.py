"""``DaemonThreads``, the on-demand daemon threads of the executors' pool and of the spool's
re-sending: bounded, in order, ended when idle, and joined by ``stop``."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from actors.executors import DaemonThreads, ThreadsStopped

WAIT = 10.0  # seconds at most for what takes milliseconds


def _alive(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix + "-")]


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _threads(
    handle: Callable[[int, int], None], limit: int, idle_timeout: float | None = None
) -> DaemonThreads[int, int]:
    return DaemonThreads(
        f"t-{uuid.uuid4().hex[:8]}", limit, handle, lambda index: index, idle_timeout=idle_timeout
    )


def test_at_most_limit_threads_run_the_work_then_stop_joins_them_all():
    release, running, peak, lock = threading.Event(), [0], [0], threading.Lock()

    def handle(_: int, item: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(WAIT)
        with lock:
            running[0] -= 1

    pool = _threads(handle, limit=2)
    for i in range(6):
        pool.submit(i)
    _until(lambda: running[0] == 2)
    assert len(pool.threads()) == 2 and len(_alive(pool.name)) == 2
    release.set()
    assert pool.stop(WAIT) is True  # the queued work is done first, then the threads end
    assert peak[0] == 2 and running[0] == 0
    assert _alive(pool.name) == [] and pool.threads() == []
    with pytest.raises(ThreadsStopped):
        pool.submit(7)


def test_each_thread_takes_its_work_in_the_order_it_was_submitted():
    done: list[tuple[int, int]] = []  # (thread number, item)
    pool = _threads(lambda index, item: done.append((index, item)), limit=3)
    for i in range(60):
        pool.submit(i)
    assert pool.stop(WAIT)
    assert sorted(item for _, item in done) == list(range(60))
    for index in {index for index, _ in done}:
        mine = [item for i, item in done if i == index]
        assert mine == sorted(mine), f"thread {index} took {mine}"

    one: list[int] = []
    single = _threads(lambda _, item: one.append(item), limit=1)
    for i in range(20):
        single.submit(i)
    assert single.stop(WAIT)
    assert one == list(range(20))


def test_an_idle_thread_ends_and_the_next_submit_starts_another():
    opened: list[int] = []
    closed: list[int] = []
    done: list[int] = []
    pool: DaemonThreads[int, int] = DaemonThreads(
        f"t-{uuid.uuid4().hex[:8]}",
        2,
        lambda _, item: done.append(item),
        lambda index: opened.append(index) or index,
        closed.append,
        idle_timeout=0.05,
    )
    try:
        pool.submit(1)
        _until(lambda: done == [1] and _alive(pool.name) == [])
        assert closed == opened == [0]  # its state was released as it ended
        pool.submit(2)
        _until(lambda: done == [1, 2])
    finally:
        assert pool.stop(WAIT)
    assert _alive(pool.name) == [] and len(closed) == len(opened) == 2


def test_a_failing_item_is_logged_and_the_thread_goes_on(caplog):
    done: list[int] = []

    def handle(_: int, item: int) -> None:
        if item == 0:
            raise ValueError("boom")
        done.append(item)

    pool: DaemonThreads[int, int] = DaemonThreads(
        f"t-{uuid.uuid4().hex[:8]}", 1, handle, lambda index: index, what="the test's work"
    )
    with caplog.at_level(logging.ERROR, logger="runactors.executors"):
        pool.submit(0)
        pool.submit(1)
        assert pool.stop(WAIT)
    assert done == [1]
    assert "the test's work failed" in caplog.text and "boom" in caplog.text


def test_stop_waits_no_longer_than_its_timeout():
    release = threading.Event()
    pool = _threads(lambda _, item: release.wait(WAIT) and None, limit=1)
    pool.submit(0)
    _until(lambda: len(pool.threads()) == 1)
    try:
        started = time.monotonic()
        assert pool.stop(0.1) is False  # the thread is still in its item
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        assert pool.stop(WAIT) is True
    assert _alive(pool.name) == []


def test_take_more_takes_the_wanted_items_queued_now_and_leaves_the_others_in_order():
    release, groups = threading.Event(), []
    pool: DaemonThreads[int, int]

    def handle(_: int, item: int) -> None:
        if item == 0:  # holds the only thread while the rest is queued
            release.wait(WAIT)
            return
        groups.append([item, *pool.take_more(lambda more: more % 2 == 0, 3)])

    pool = _threads(handle, limit=1)
    for i in range(11):
        pool.submit(i)
    _until(lambda: len(pool.threads()) == 1)
    release.set()
    assert pool.stop(WAIT)
    # 1 takes the even ones among the first 2 x 3 queued after it (2, 4, 6); the odd ones
    # stay in their order, each taking the even ones still queued.
    assert groups == [[1, 2, 4, 6], [3, 8, 10], [5], [7], [9]]


def test_jobs_taken_with_a_group_that_did_not_store_them_go_to_idle_threads() -> None:
    """A pool thread that took jobs for a group and could not store them (a patched
    log_batch, a failed group) performs the first and puts the others back for idle
    threads: a slow run never holds up one that was merely taken with it (it did: the
    healthy run waited behind the slow one on the same thread)."""
    from actors.delivery._jobs import Job, JobResult
    from actors.executors._executor import JobPool

    in_turn, queued_both = threading.Event(), threading.Event()
    release = threading.Event()
    done: dict[str, str] = {}

    class Pool(JobPool[str]):
        group_jobs = 2

        def _open(self, index: int) -> str:
            return threading.current_thread().name

        def _groupable(self, job: Job) -> bool:
            return True

        def _group_turn(self, job: Job):  # type: ignore[no-untyped-def]
            in_turn.set()
            queued_both.wait(WAIT)  # the second job is queued before the group is taken
            return super()._group_turn(job)

        def _perform(self, state: str, job: Job, on_state: object) -> JobResult:
            if job.label == "slow":
                release.wait(WAIT)
            done[job.label] = state
            return JobResult(run_id=job.run_id)

    pool = Pool(4, f"grouppool-{uuid.uuid4().hex[:6]}")
    try:
        jobs = [
            Job("sqlite:///x.db", "r-" + label, [], 1.0, label=label)
            for label in ("slow", "healthy")
        ]
        pool.submit(jobs[0], lambda *a, **k: None, lambda result: None)
        assert in_turn.wait(WAIT)
        # Queued while every thread is busy (here: the only one), so the group takes it.
        pool._threads._queue.append((jobs[1], lambda *a, **k: None, lambda result: None))
        queued_both.set()
        _until(lambda: "healthy" in done)
        assert "slow" not in done  # the healthy job did not wait behind the slow one
        release.set()
        _until(lambda: "slow" in done)
        assert done["healthy"] != done["slow"]
    finally:
        release.set()
        pool.shutdown(WAIT)
