"""The registry of this process's open clients: what a status server serves, what a fork resets.

Its own module so that both :mod:`client._client` (which adds and removes clients) and
:mod:`client._status_server` (which reads them) import it, and neither imports the other.
"""

from __future__ import annotations

import weakref
from typing import Protocol

from actors import ClientStatus

STATUS_PORT_ENV = "RUNACTORS_STATUS_PORT"  # set: the first client starts a status server


class OpenClient(Protocol):
    """What the registry needs of a client."""

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
