"""What ``GET /healthz`` reports: the faults of every open client, one line each.

A client's faults are those of the runtime its session runs on
(:func:`actors.session_problems`: the supervisor actor and the ticker thread, the run
actors, the worker pool, the spool), and its keeper process. A check of another part of a
client is one more line in :func:`client_health`. A client closing, closed or not used yet
has none: its actors and pool stop on purpose, or have not started.
"""

from __future__ import annotations

from actors import session_problems
from client._registry import OpenClient, open_clients


def client_health(client: OpenClient) -> list[str]:
    """What keeps ``client`` from delivering now, one line per fault (empty: nothing)."""
    session = None if client._closed else client._session
    if session is None:
        return []
    problems = session_problems(session)  # actors, ticker, worker pool, spool
    if session.keeper_state() == "dead":  # restarted at once; dead: it died too often
        problems.append("its keeper process died and is not restarted (see status().keeper)")
    return [f"client {session.id}: {problem}" for problem in problems]


def health_problems() -> list[str]:
    """Every open client's faults; empty: all are healthy (``200 ok``)."""
    return [problem for client in open_clients() for problem in client_health(client)]
