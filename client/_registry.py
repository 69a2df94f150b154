"""The registry of this process's open clients: what a status server serves, what a fork resets,
and what becomes of a client dropped without ``close()``.

Its own module so that both :mod:`client._client` (which adds and removes clients) and
:mod:`client._status_server` (which reads them) import it, and neither imports the other.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Protocol

from actors import ClientStatus, Session, exit_timeout, get_system

STATUS_PORT_ENV = "RUNACTORS_STATUS_PORT"  # set: the first client starts a status server


def start_status_from_env() -> None:
    """Start the process's status server if ``RUNACTORS_STATUS_PORT`` asks for one."""
    if os.environ.get(STATUS_PORT_ENV) is not None:
        from client._status_server import start_from_environment

        start_from_environment()


class OpenClient(Protocol):
    """What the registry needs of a client (and :mod:`client._health`, its session)."""

    _closed: bool
    _session: Session | None

    def status(self) -> ClientStatus: ...

    def _after_fork_in_child(self) -> None: ...


# Every client alive in this process, so that a forked child can reset them.
live: weakref.WeakSet[OpenClient] = weakref.WeakSet()


def open_clients() -> list[OpenClient]:
    """Every open client of this process, and those still closing (what a status server
    serves: a client leaves ``live`` when its ``close()`` returns)."""
    while True:
        try:
            return list(live)
        except RuntimeError:  # a client was made while we read the set: read it again
            continue


def release(session: Session) -> None:
    """Finalizer of a client dropped without ``close()``: send what it queued, then stop;
    what is lost is logged (warnings), as the exit handler logs it.

    Runs on its own short-lived thread, since garbage collection may happen anywhere, and
    within ``RUNACTORS_EXIT_TIMEOUT`` seconds, as at exit: a hung store must not keep the
    thread, the session's actors and its executor forever.
    """
    if session.closed:
        return

    def close() -> None:
        # Nobody to raise to: what close() would raise is logged, as at exit.
        get_system().close_unattended(session, exit_timeout(), "a client dropped without close()")

    threading.Thread(target=close, name="runactors-release", daemon=True).start()
