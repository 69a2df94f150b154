"""A reverse proxy that can be down (HTTP 503 on every request) and can hold requests until
several are held at once: it shows how many calls a client makes *concurrently*, counted,
not timed."""

from __future__ import annotations

import threading

from servers import FORWARD, Action, Proxy


class HoldingProxy(Proxy):
    """In front of ``upstream``. ``down``: every request is answered 503 (as a gateway in
    front of a stopped server answers). :meth:`hold` makes the next requests wait until
    ``count`` of them are held at once; ``held`` is how many are held now, ``max_held`` the
    most held at once since :meth:`hold`."""

    def __init__(self, upstream: str) -> None:
        self.down = False
        self.held = 0
        self.max_held = 0
        self._cond = threading.Condition()
        self._target = 0
        self._timeout = 0.0
        super().__init__(upstream)

    def hold(self, count: int, timeout: float) -> None:
        """Hold each request from now on until ``count`` are held at once, then let them all
        go on and hold no more; a request held ``timeout`` s goes on and ends the holding."""
        with self._cond:
            self._target, self._timeout, self.max_held = count, timeout, 0

    def release(self) -> None:
        """Let every held request go on, and hold no more."""
        with self._cond:
            self._target = 0
            self._cond.notify_all()

    def policy(self, path: str) -> Action:
        with self._cond:
            if self._target:
                self.held += 1
                self.max_held = max(self.max_held, self.held)
                if self.held >= self._target or not self._cond.wait_for(
                    lambda: not self._target, self._timeout
                ):
                    self._target = 0
                    self._cond.notify_all()
                self.held -= 1
        return 503 if self.down else FORWARD

    def close(self) -> None:
        self.release()
        super().close()
