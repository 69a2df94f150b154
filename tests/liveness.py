"""What a test leaves running: threads and worker processes, and waiting for them to go.

Plain helpers (not fixtures) for the tests that check that a client stops what it started.
"""

from __future__ import annotations

import os
import threading
import time


def wait_for_threads(baseline: int, timeout: float = 30.0) -> int:
    """Wait until at most ``baseline`` threads remain (threads take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return threading.active_count()


def run_actor_threads() -> list[str]:
    """Names of the live threads of run actors (Pykka names them after the class)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("RunActor")]


def wait_for_no_run_actors(timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while run_actor_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return run_actor_threads()


def alive(pid: int) -> bool:
    """Whether a process with this PID exists (a zombie counts: it is not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def processes_with_env(marker: str) -> set[int]:
    """PIDs of the processes (any parent) whose environment holds ``marker``."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read():
                        found.add(int(entry))
            except OSError:
                continue
    return found


def running(pid: int) -> bool:
    """Whether a process with this PID exists and is not a zombie (an orphan, such as a
    keeper, is reaped by init or a subreaper, maybe a moment after it exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False
