"""A client session's health: what ``GET /healthz`` (a Kubernetes liveness probe) reports.

Each part of the runtime a session depends on says what keeps it from working now, as
lines that name it: the process's supervisor actor and ticker thread, the session's run
actors, its executor (the worker pool) and its spool. Nothing here sends an actor a
message or waits on a lock a flush may hold, so a probe answers at once, also while a
flush waits on a slow store (a slow store is not a fault of the process: restarting it
would not help).
"""

from __future__ import annotations

from actors.runtime._session import Session
from actors.runtime._system import get_system


def session_problems(session: Session) -> list[str]:
    """Why this open session cannot deliver what its client queues (empty: it can)."""
    if session.closed or session.sealed:  # closing: its actors and pool stop on purpose
        return []
    problems: list[str] = []
    system = get_system()
    if not system.supervisor.is_alive():
        problems.append("actor system: the supervisor actor is dead (no flush can start)")
    if session.config.flush_interval is not None and system.ticker.died():
        problems.append(
            "actor system: the ticker thread (runactors-ticker) died: "
            "no background flush (flush_interval) happens"
        )
    for handle in list(session.handles.values()):
        ref = handle.ref
        if ref is not None and not ref.is_alive():
            problems.append(f"run {handle.record.label}: its actor is dead")
    executor = session.started_executor()
    if executor is not None:
        problems += executor.problems()
    if session.spooler is not None:
        problems += session.spooler.problems()
    return problems
