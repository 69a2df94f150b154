"""Ctrl-C in the sweep: noted by the parent alone, kept away from the workers it spawns.

Workers are spawned with SIGINT blocked and then ignore it, so a Ctrl-C (which a terminal
sends to every process of the group) never breaks one, even mid-import. The first Ctrl-C
stops handing out trials and asks the running ones to stop at their next epoch, so their
runs end as KILLED; a second one, or a trial that does not stop within
:data:`~client.sweep.options.STOP_GRACE_SECONDS`, gets its worker killed and its run
terminated by the parent. The parent run ends KILLED and the command exits with status 130.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class CtrlC:
    """The parent's SIGINT handler while the sweep runs: the first Ctrl-C is noted (the sweep
    then starts no new trial and stops the running ones at their next epoch), the second
    raises ``KeyboardInterrupt`` (the workers are then killed at once).

    Noting rather than raising lets the parent react at points of its choosing: an exception
    raised in the middle of a pipe read or of the client's flush would leave either broken.
    """

    def __init__(self) -> None:
        self.presses = 0

    @property
    def pressed(self) -> bool:
        return self.presses > 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.presses += 1
        if self.presses > 1:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Within the block, SIGINT goes to this handler (in the main thread only: Python runs
        signal handlers there; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Within the block, SIGINT is blocked in this thread, and so in every thread and process
    started from it, which inherit the mask: a spawned interpreter imports for seconds before
    any of our code can ignore the signal, and a Ctrl-C meanwhile would kill it. The parent
    itself still sees the signal (the kernel hands it to a thread that does not block it, or
    to this one when the block ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
