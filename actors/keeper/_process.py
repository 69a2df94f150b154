"""The keeper's process, detached from the process that starts it (a double fork).

The keeper must outlive its parent, also where the parent's death takes its children along:
Ray kills a worker's child processes when the worker exits (``RAY_kill_child_processes_on_
worker_exit``, on by default: the worker lists the processes whose parent is itself, in
``/proc``, and SIGKILLs them), and Ray's per-worker process groups kill the worker's group.
So the keeper is no child of its parent, and in no group of it: the parent starts an
*intermediate* (``python -c BOOTSTRAP``, a session of its own), which forks the keeper, sends
the parent the keeper's PID and a pidfd of it (``SCM_RIGHTS`` on the keeper's socket) and
exits at once; the parent reaps it. The keeper, orphaned, is re-parented to init (or the
nearest subreaper), which reaps it when it exits. Ray's opt-in raylet subreaper
(``RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper``) adopts such orphans and
kills them: it still takes the keeper along.

The parent watches its keeper through the pidfd (readable once it exited), kills it with
``pidfd_send_signal`` and cannot reap it (init does), unless it is itself the keeper's
reaper (it is init: PID 1 of a container, or a subreaper).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from typing import Any

START_TIMEOUT = 30.0  # seconds the intermediate may take to fork the keeper (a bare interpreter)
POLL = 0.5  # seconds between looks at a keeper without a pidfd (no pidfd support)

# The start of the keeper's ``python -c`` program: fork; the intermediate tells the parent who
# the keeper is on the socket (``argv[2]``) and exits; the keeper goes on with what follows.
FORK = (
    "import os, socket, sys\n"
    "pid = os.fork()\n"
    "if pid:\n"
    "    try:\n"
    "        fds = [os.pidfd_open(pid)]\n"
    "    except (AttributeError, OSError):\n"
    "        fds = []\n"
    "    socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [b'%d\\n' % pid], fds)\n"
    "    os._exit(0)\n"
)


def own_pidfd() -> int | None:
    """A pidfd of this process (handed to the keeper, which watches it), or None."""
    try:
        return os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return None


class KeeperProcess:
    """A running keeper: its PID and, where the OS has them, a pidfd of it."""

    def __init__(self, pid: int, pidfd: int | None) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._gone = False

    @classmethod
    def start(cls, command: list[str], sock: socket.socket, **popen: Any) -> KeeperProcess:
        """Run ``command`` (an intermediate that forks the keeper, see :data:`FORK`), wait
        for it, and read the keeper's PID and pidfd from ``sock`` (the parent's end)."""
        intermediate = subprocess.Popen(command, start_new_session=True, **popen)
        try:
            code = intermediate.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            intermediate.kill()
            intermediate.wait()
            raise RuntimeError(f"the keeper did not start within {START_TIMEOUT:.0f} s") from None
        if code != 0:
            raise RuntimeError(f"the keeper's start failed (exit status {code})")
        timeout = sock.gettimeout()
        sock.setblocking(False)  # sent before the intermediate exited: in the buffer now
        try:
            data, fds, _, _ = socket.recv_fds(sock, 64, 1)
        except BlockingIOError:
            data, fds = b"", []
        finally:
            sock.settimeout(timeout)
        if not data.endswith(b"\n"):
            for fd in fds:
                os.close(fd)
            raise RuntimeError("the keeper's start failed (no word of its PID)")
        return cls(int(data), fds[0] if fds else None)

    def exited(self) -> bool:
        """Whether the keeper is gone (it may wait for its reaper a moment longer)."""
        return self.wait(0)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the keeper to exit; whether it did."""
        if self._gone:
            return True
        if self._pidfd is not None:
            try:
                return bool(select.select([self._pidfd], [], [], timeout)[0])
            except (OSError, ValueError):  # closed under us (a fork child's reset)
                return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # pragma: no cover - reused by another user's process
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(POLL, max(deadline - time.monotonic(), 0.0)))

    def kill(self) -> None:
        """SIGKILL the keeper (through its pidfd: never another process that took its PID)."""
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            elif not self._gone:
                os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass

    def release(self) -> None:
        """The keeper exited: reap it if it is our child (this process is its reaper: PID 1
        of a container, or a subreaper), and close the pidfd."""
        self._gone = True
        fd, self._pidfd = self._pidfd, None
        if fd is None:
            return
        try:
            os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        except (AttributeError, ChildProcessError, OSError):
            pass  # not ours: init (or a subreaper) reaps it
        os.close(fd)

    def forget(self) -> None:
        """In a fork child: close our copy of the pidfd, touch nothing else."""
        fd, self._pidfd, self._gone = self._pidfd, None, True
        if fd is not None:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
