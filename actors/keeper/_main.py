"""The keeper process: what it hears from its parent, and how it watches the parent die.

Started by :mod:`actors.keeper._link` as ``python -c BOOTSTRAP PATH FD PID PIDFD`` (this file
loaded by its path, the current folder off ``sys.path``), forked off by an intermediate that
exits (:mod:`actors.keeper._process`): no child of its parent, in a session of its own, so a
terminal's Ctrl-C, a signal to the parent's process group, or a kill of the parent's children
(Ray's, when a worker exits) does not reach it. It watches the parent through ``PIDFD``, a
pidfd the parent opened of itself (``-1``: none, it then polls the PID).

While the parent lives it only reads records (JSON lines, see :func:`encode`) from its end of a
socketpair and keeps them in a :class:`KeeperState`: what the parent's clients with
``spool_dir`` are, their journals, the runs they created and have not terminated, the parent's
worker processes (each record ``W`` carries a pidfd of the worker, ``SCM_RIGHTS``). What the
parent wrote before it died is in the socket's buffer, so the state is whole up to the moment of
the death.

Only the standard library is imported here: an idle keeper costs a bare interpreter. The
recovery (:mod:`actors.keeper._recovery`: MLflow, the journal) is imported when the parent
dies, or a few seconds after the start in the background (``RUNACTORS_KEEPER_WARMUP``), so
that a death later on is handled at once.

How it ends: an end of file with every session closed (a clean ``close()``, or the last
client of the process closed) exits at once; the parent's death (its pidfd, or the end of
file followed by it) runs the recovery, then exits; an end of file while the parent lives
on (its descriptors closed under it) exits too, and the parent starts a new keeper.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import threading
import time
from typing import Any

READ_SIZE = 65536
MAX_FDS = 64
# After an end of file with sessions open, how long the parent may take to be seen dead
# (its descriptors close a moment before it is reaped) before the keeper leaves it be.
DEATH_GRACE = 5.0
WARMUP_ENV = "RUNACTORS_KEEPER_WARMUP"
DEFAULT_WARMUP = 10.0  # seconds before the recovery's imports are made in the background


def encode(record: dict[str, Any]) -> bytes:
    """One record on the wire: a line of compact JSON."""
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


class KeeperState:
    """What the parent said, applied record by record.

    ``sessions``: session id -> its ``S`` record plus ``journals`` (paths) and ``runs``
    (key -> ``{"create": ..., "run_id": ...}``: created, not known terminated).
    ``workers``: worker pid -> a pidfd of it.
    """

    def __init__(self) -> None:
        self.sessions: dict[int, dict[str, Any]] = {}
        self.workers: dict[int, int] = {}
        self._buffer = b""
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: list[int]) -> None:
        self._fds.extend(fds)
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.apply(record)

    def apply(self, record: dict[str, Any]) -> None:
        op = record.get("op")
        if op == "W":
            fd = self._fds.pop(0) if self._fds else None
            self._prune_workers()
            if fd is not None:
                self.workers[int(record["pid"])] = fd
            return
        session_id = record.get("session")
        if op == "S":
            self.sessions[int(record["session"])] = {**record, "journals": [], "runs": {}}
            return
        session = self.sessions.get(int(session_id)) if session_id is not None else None
        if session is None:
            return
        if op == "X":
            del self.sessions[int(session_id)]  # type: ignore[arg-type]
        elif op == "J" and record["path"] not in session["journals"]:
            session["journals"].append(record["path"])
        elif op == "C":
            session["runs"][record["key"]] = {"create": record["create"], "run_id": None}
        elif op == "I" and record["key"] in session["runs"]:
            session["runs"][record["key"]]["run_id"] = record["run_id"]
        elif op == "T":
            session["runs"].pop(record["key"], None)

    def _prune_workers(self) -> None:
        """Forget workers that are gone (their pidfd is readable)."""
        for pid, fd in list(self.workers.items()):
            if select.select([fd], [], [], 0)[0]:
                os.close(fd)
                del self.workers[pid]

    def finish(self) -> None:
        """Close descriptors that came without a complete record (the parent died mid-send)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _parent_gone(parent: int) -> bool:
    """Without a pidfd: whether the parent's PID is gone (a zombie still counts as there)."""
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # pragma: no cover - the PID was reused by another user's process
        return True
    return False


def _drain(sock: socket.socket, state: KeeperState) -> None:
    """Read what is left in the socket (the parent is dead: nothing more comes)."""
    sock.setblocking(False)
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, READ_SIZE, MAX_FDS)
        except (BlockingIOError, OSError):
            return
        if not data:
            for fd in fds:
                os.close(fd)
            return
        state.feed(data, fds)


def watch(sock: socket.socket, parent: int, state: KeeperState, pidfd: int | None = None) -> str:
    """Read records until the parent closes cleanly (``"closed"``), dies (``"died"``) or
    lets go of the keeper while it lives on (``"left"``). ``pidfd``: one of the parent."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    eof_at: float | None = None
    while True:
        timeout: float | None = None if pidfd is not None else 0.5
        if eof_at is not None:
            timeout = max(DEATH_GRACE - (time.monotonic() - eof_at), 0.0)
        events = dict(poller.poll(None if timeout is None else int(timeout * 1000) + 1))
        dead = (pidfd in events) if pidfd is not None else _parent_gone(parent)
        if eof_at is None and sock.fileno() in events:
            data, fds, _, _ = socket.recv_fds(sock, READ_SIZE, MAX_FDS)
            if data:
                state.feed(data, fds)
            else:
                eof_at = time.monotonic()
                poller.unregister(sock)
                if not state.sessions:
                    return "closed"
        if dead:
            if eof_at is None:
                _drain(sock, state)
            return "died" if state.sessions else "closed"
        if eof_at is not None and time.monotonic() - eof_at >= DEATH_GRACE:
            return "left"


def _warm_up(delay: float, state: KeeperState) -> None:
    """Import the recovery and open the stores now, so that a death is handled at once."""
    time.sleep(delay)
    try:
        from actors.keeper._recovery import prepare
    except Exception:  # reported, if it matters, when the recovery needs it
        return
    while True:  # sessions opened later may use other stores
        prepare(state.sessions)
        time.sleep(1.0)


def main(argv: list[str]) -> None:
    fd, parent = int(argv[0]), int(argv[1])
    pidfd = int(argv[2]) if len(argv) > 2 and int(argv[2]) >= 0 else None
    os.chdir("/")
    sock = socket.socket(fileno=fd)
    try:
        delay = float(os.environ.get(WARMUP_ENV, DEFAULT_WARMUP))
    except ValueError:
        delay = DEFAULT_WARMUP
    state = KeeperState()
    threading.Thread(target=_warm_up, args=(delay, state), name="warm-up", daemon=True).start()
    outcome = watch(sock, parent, state, pidfd)
    state.finish()
    if outcome == "died":
        died_ms = int(time.time() * 1000)
        try:
            from actors.keeper._recovery import recover

            recover(parent, state.sessions, state.workers, died_ms)
        except BaseException as exc:
            sys.stderr.write(f"runactors: the keeper of process {parent} failed: {exc!r}\n")
            sys.stderr.flush()
            os._exit(1)
    # os._exit: a warm-up import may still be running; nothing here needs cleaning up.
    os._exit(0)
