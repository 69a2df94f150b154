"""The process's side of its keeper: starting it, telling it what happens, restarting it.

One :class:`KeeperLink` per process (:data:`LINK`) serves every client with ``spool_dir``:
the first such session starts the keeper (:mod:`actors.keeper._main`), the last one to close
lets it go (its socket closed: the keeper sees the end of file with every session closed and
exits at once; a keeper that lingers is killed 2 s later). In between, the runtime tells it,
as they happen, in records written to a socketpair (what is in the socket's buffer survives
the writer's death, SIGKILL included):

``S`` a session opened (its store, spool folder, retry_timeout), ``X`` it closed cleanly;
``J`` its journal was created; ``C`` a run was created (its creation: key, experiment, start
time, name, tags, create key), ``I`` its ID is known, ``T`` its termination was delivered;
``W`` a worker process started (with a pidfd of it).

The keeper is detached (:mod:`actors.keeper._process`: a double fork, no child of this
process, so that what kills this process's children, Ray's cleanup of a dead worker's, does
not kill it). The link keeps the same state itself, so a keeper that dies is replaced by a
new one that hears all of it again (a watcher thread waits on the keeper's pidfd; more than
:data:`MAX_RESTARTS` deaths within :data:`RESTART_WINDOW` seconds leave it ``dead``, as
``status()`` then says). A write that fails or blocks for :data:`SEND_TIMEOUT` seconds (a
stuck keeper) kills the keeper, which is then replaced. A fork child drops the parent's
keeper (closes its copy of the socket, which would otherwise keep the keeper from seeing the
parent's death) and starts its own when it needs one.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from actors.executors import _process_executor
from actors.executors._template import _PACKAGE_ROOT, _site_dirs
from actors.keeper._main import encode
from actors.keeper._process import FORK, KeeperProcess, own_pidfd
from actors.queueing._queues import CreateRunCall

_logger = logging.getLogger("runactors.keeper")

MAIN_PATH = str(Path(__file__).resolve().with_name("_main.py"))

# ``python -c BOOTSTRAP PATH FD PID PIDFD``: forked off (FORK), then the keeper's module loaded
# by its path, so that an idle keeper imports the standard library only (not the ``actors``
# package and MLflow), with the current folder off ``sys.path`` (a project's own ``actors/``
# folder cannot shadow ours).
BOOTSTRAP = (
    "import sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n" + FORK + "import importlib.util\n"
    "spec = importlib.util.spec_from_file_location('runactors_keeper', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module.main(sys.argv[2:])\n"
)

ENABLED_ENV = "RUNACTORS_KEEPER"  # "0": no keeper (a death leaves it all to runactors replay)
SEND_TIMEOUT = 1.0  # seconds a record may wait for room in the socket
STOP_GRACE = 2.0  # seconds a keeper let go of may take to exit before it is killed
MAX_RESTARTS = 3
RESTART_WINDOW = 30.0


def enabled() -> bool:
    """Whether clients with ``spool_dir`` get a keeper (``RUNACTORS_KEEPER`` is not ``0``)."""
    return os.environ.get(ENABLED_ENV, "1").strip() != "0"


def _create_json(create: CreateRunCall) -> dict[str, Any]:
    return {
        "experiment_id": create.experiment_id,
        "start_time": create.start_time,
        "tags": [list(pair) for pair in create.tags],
        "run_name": create.run_name,
        "create_key": create.create_key,
    }


class KeeperLink:
    """The keeper of this process, and what it has been told (to tell a new one again)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.RLock()
        self._sessions: dict[int, dict[str, Any]] = {}  # id -> its S record
        self._journals: dict[int, list[str]] = {}
        self._runs: dict[int, dict[str, dict[str, Any]]] = {}  # id -> key -> C, I records
        self._workers: dict[int, int] = {}  # pid -> our dup of its pidfd
        self._proc: KeeperProcess | None = None
        self._sock: socket.socket | None = None
        self._deaths: collections.deque[float] = collections.deque()
        self.restarts = 0
        self.dead = False  # died too often, or could not be started: not restarted

    # -- what status() says ------------------------------------------------------------

    def state(self) -> str:
        """``running``, ``restarted`` (running, after a restart) or ``dead``. Without the
        lock: ``status()`` answers at once, also while a record waits for the socket."""
        proc = self._proc
        if self.dead or proc is None or proc.exited():
            return "dead"
        return "restarted" if self.restarts else "running"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    # -- the runtime's records ---------------------------------------------------------

    def open_session(self, session_id: int, config: Any) -> None:
        record = {
            "op": "S",
            "session": session_id,
            "tracking_uri": config.tracking_uri,
            "spool_dir": config.spool_dir,
            "retry_timeout": config.retry_timeout,
            "end_runs": bool(getattr(config, "end_runs", True)),
        }
        with self._lock:
            self._sessions[session_id] = record
            self._journals[session_id], self._runs[session_id] = [], {}
            if self._proc is None:  # the first session, or the keeper is dead: a fresh one
                self.dead, self.restarts = False, 0
                self._deaths.clear()
                try:
                    self._start()  # tells it every session, this one included
                except Exception as exc:  # the client works on; status() says "dead"
                    _logger.warning("the keeper process could not be started: %r", exc)
            else:
                self._send(record)

    def close_session(self, session_id: int) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                return
            del self._journals[session_id], self._runs[session_id]
            self._send({"op": "X", "session": session_id})
            if not self._sessions:
                self._let_go()

    def journal(self, session_id: int, path: Path) -> None:
        with self._lock:
            if session_id in self._sessions:
                self._journals[session_id].append(os.path.abspath(path))
                self._send({"op": "J", "session": session_id, "path": os.path.abspath(path)})

    def created(self, session_id: int, key: str, create: CreateRunCall) -> None:
        with self._lock:
            runs = self._runs.get(session_id)
            if runs is not None:
                runs[key] = {"create": _create_json(create), "run_id": None}
                self._send({"op": "C", "session": session_id, "key": key, **runs[key]})

    def run_id(self, session_id: int, key: str, run_id: str) -> None:
        with self._lock:
            run = self._runs.get(session_id, {}).get(key)
            if run is not None:
                run["run_id"] = run_id
                self._send({"op": "I", "session": session_id, "key": key, "run_id": run_id})

    def terminated(self, session_id: int, key: str) -> None:
        with self._lock:
            if self._runs.get(session_id, {}).pop(key, None) is not None:
                self._send({"op": "T", "session": session_id, "key": key})

    def worker(self, pid: int, pidfd: int) -> None:
        """A worker process started (a hook of the process executor; never raises)."""
        try:
            with self._lock:
                if not self._sessions:
                    return
                for known, fd in list(self._workers.items()):  # forget the ones gone
                    if _exited(fd):
                        os.close(fd)
                        del self._workers[known]
                self._workers[pid] = os.dup(pidfd)
                self._send({"op": "W", "pid": pid}, [self._workers[pid]])
        except Exception:  # pragma: no cover - the worker is not the keeper's to fail
            _logger.debug("telling the keeper of a worker failed", exc_info=True)

    # -- the keeper process ------------------------------------------------------------

    def _send(self, record: dict[str, Any], fds: list[int] | None = None) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            if fds:
                socket.send_fds(sock, [encode(record)], fds)
            else:
                sock.sendall(encode(record))
        except OSError:  # dead (its watcher restarts it) or stuck: killed, then restarted
            _logger.debug("writing to the keeper failed", exc_info=True)
            self._kill()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None:
            proc.kill()

    def _start(self) -> None:
        """Start a keeper and tell it everything (under the lock)."""
        env = dict(os.environ)
        if _PACKAGE_ROOT not in _site_dirs():  # running from a source tree: point at it
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p
            )
        ours, theirs = socket.socketpair()
        me = own_pidfd()  # the keeper watches this process through it (no child of ours)
        args = [MAIN_PATH, str(theirs.fileno()), str(os.getpid()), str(-1 if me is None else me)]
        try:
            proc = KeeperProcess.start(  # in a session of its own: group signals pass it by
                [sys.executable, "-c", BOOTSTRAP, *args],
                ours,
                pass_fds=(theirs.fileno(),) if me is None else (theirs.fileno(), me),
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            self.dead = True
            raise
        finally:
            theirs.close()
            if me is not None:
                os.close(me)
        ours.settimeout(SEND_TIMEOUT)
        self._proc, self._sock = proc, ours
        for session_id, record in self._sessions.items():
            self._send(record)
            for path in self._journals[session_id]:
                self._send({"op": "J", "session": session_id, "path": path})
            for key, run in self._runs[session_id].items():
                self._send({"op": "C", "session": session_id, "key": key, **run})
        for pid, fd in self._workers.items():
            self._send({"op": "W", "pid": pid}, [fd])
        threading.Thread(
            target=self._watch, args=(proc,), name="runactors-keeper-watch", daemon=True
        ).start()

    def _let_go(self) -> None:
        """No session left: close the socket (the keeper exits); its watcher reaps it."""
        sock, self._sock, self._proc = self._sock, None, None
        if sock is not None:
            sock.close()
        for fd in self._workers.values():
            os.close(fd)
        self._workers.clear()

    def _watch(self, proc: KeeperProcess) -> None:
        """Wait for the keeper to exit; restart it if it died while sessions are open."""
        let_go: float | None = None
        while not proc.wait(0.5):
            if self._proc is proc:
                continue
            let_go = let_go or time.monotonic()
            if time.monotonic() - let_go > STOP_GRACE:
                proc.kill()
        proc.release()
        with self._lock:
            if self._proc is not proc:  # let go of, or replaced: reaped, nothing more
                return
            sock, self._sock, self._proc = self._sock, None, None
            if sock is not None:
                sock.close()
            if not self._sessions:
                return
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths and now - self._deaths[0] > RESTART_WINDOW:
                self._deaths.popleft()
            if len(self._deaths) > MAX_RESTARTS:
                self.dead = True
                _logger.warning(
                    "the keeper process died %d times within %.0f s; not restarted: a death "
                    "of this process now leaves its runs RUNNING and its journal for "
                    "`runactors replay`",
                    len(self._deaths),
                    RESTART_WINDOW,
                )
                return
            self.restarts += 1  # before it runs: status() never reads "running" for it
            try:
                self._start()
            except Exception as exc:
                _logger.warning("the keeper process died and could not be restarted: %r", exc)
                return
            _logger.warning("the keeper process %d died; a new one was started", proc.pid)

    def _after_fork_in_child(self) -> None:
        """The parent's keeper is not ours: drop our copies of its socket and pidfds."""
        sock, proc = self._sock, self._proc
        if sock is not None:
            sock.close()
        if proc is not None:
            proc.forget()
        for fd in self._workers.values():
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
        self._reset()


def _exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


LINK = KeeperLink()
_process_executor.worker_started.append(LINK.worker)


def _after_fork_in_child() -> None:
    LINK._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
