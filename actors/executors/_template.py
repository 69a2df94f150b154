"""The worker template of the process executor: one pre-imported process that forks workers.

A worker process needs MLflow and the store code, about 2 s of CPU to import; paid by each
fresh interpreter, serially on a small machine, that made the first flush of a process-executor
client slower than logging directly. So each process that uses the process executor has one
*template* (the "zygote" pattern): a fresh interpreter (started by ``python_main``, never a
fork of the user's process, so a user's unguarded ``__main__`` is never re-imported)
that imports that code once, in the background from the moment the first process executor is
made, and then forks a worker per request. The template never starts a thread or takes a lock,
so forking it is safe; it holds no state, so it can be killed at any time.

A request is one byte on the control socket carrying (``SCM_RIGHTS``) the worker's end of a
fresh socketpair. The forked worker starts its own session (a terminal's Ctrl-C does not reach
it), closes the control socket and runs :func:`actors.executors._worker.serve_forked` on its socket:
workers still exit when their parent's end of the socket closes. The template's children are
reaped by the kernel (``SIGCHLD`` ignored). The template exits when its control socket closes
(the parent exited or forked it away); the parent kills it when its last process executor shuts
down, and starts a new one on the next request if it died.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from actors.executors._python import python_main

# The folder that holds the ``actors`` package, so that the template imports the same code.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # actors/executors/_template.py

# What every worker needs, imported once here instead of in each worker. Opening a store
# (an engine, a connection pool) is left to the workers: shared by forks, it would be corrupted.
PRELOAD = (
    "actors.executors._worker",
    "actors.delivery._store",
    "actors.delivery._sql_policy",  # the SQL fast path, imported on first use elsewhere
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.tracking.sqlalchemy_workspace_store",
    "sqlalchemy.dialects.sqlite",
    "alembic.command",
)


_STANDARD_FDS = (1, 2)  # stdout, stderr: sent with each worker request


def _open_standard_fds() -> list[int]:
    """stdout and stderr, if both are open (a daemon may have closed them: then neither)."""
    try:
        for fd in _STANDARD_FDS:
            os.fstat(fd)
    except OSError:
        return []
    return list(_STANDARD_FDS)


def _preload() -> None:
    """Import what workers need, and do the in-memory set-up each would do on first use."""
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # a missing optional part: the worker reports what it cannot use
            pass
    try:  # SQLAlchemy maps MLflow's tables on the first row object made (0.2-0.3 s)
        import sqlalchemy.orm

        sqlalchemy.orm.configure_mappers()
    except Exception:
        pass
    # What is imported now is never collected: each worker's garbage collector then leaves
    # the shared pages alone instead of touching (and so copying) all of them.
    gc.freeze()


def serve(control: socket.socket) -> int | None:
    """Fork a worker per request until the control socket closes (then ``None``). Returns
    the worker's socket descriptor in a forked worker, which then runs the worker."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, 1, 1 + len(_STANDARD_FDS))
        except OSError:
            return None
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        if not fds:
            continue
        fd, standard = fds[0], fds[1:]
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.setsid()  # its own session, as ``start_new_session`` gave fresh workers
            control.close()
            if len(standard) == len(_STANDARD_FDS):  # else the parent has none: keep ours
                for target, source in zip(_STANDARD_FDS, standard, strict=True):
                    os.dup2(source, target)  # the parent's stdout and stderr of the moment
            for source in standard:
                os.close(source)
            return fd
        for each in fds:
            os.close(each)


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    _preload()
    fd = serve(control)
    if fd is not None:  # in a forked worker: serve jobs, then exit as a fresh worker would
        from actors.executors._worker import serve_forked

        serve_forked(fd)


# -- the parent's side ----------------------------------------------------------------------


def _site_dirs() -> set[str]:
    # An installed package needs no PYTHONPATH; putting site-packages there would move it
    # ahead of the standard library in the template.
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return {str(Path(d).resolve()) for d in dirs}


class _Template:
    """The parent's handle on one template process and its control socket."""

    def __init__(self) -> None:
        env = dict(os.environ)
        if _PACKAGE_ROOT not in _site_dirs():  # running from a source tree: point at it
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p
            )
        self.owner = os.getpid()
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                # Not ``python -m``: an ``actors/`` folder in the current folder would shadow us.
                python_main("actors.executors._template", str(theirs.fileno())),
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C is the user program's to handle
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.control = ours

    def alive(self) -> bool:
        return self.process.poll() is None

    def fork_worker(self, sock: socket.socket) -> None:
        """Ask for a worker that serves ``sock`` (raises ``OSError`` if the template died)."""
        # With the parent's stdout and stderr as they are now (a fresh worker inherited them
        # at its start): a worker's output goes where its parent's goes today, not where it
        # went when the template started (a log file since rotated, a test's capture).
        socket.send_fds(self.control, [b"w"], [sock.fileno(), *_open_standard_fds()])

    def stop(self) -> None:
        """Kill and reap the template: it holds no state, and its workers live on alone."""
        self.control.close()
        if os.getpid() != self.owner:  # a fork child's copy: the process is not ours
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# The process's template, shared by its process executors, and how many executors use it.
_lock = threading.Lock()
_template: _Template | None = None
_users = 0


def acquire() -> None:
    """A process executor starts using the template: start it now (in the background), so
    that its imports overlap with what the program does before its first flush."""
    global _users, _template
    with _lock:
        _users += 1
        if _template is None:
            try:
                _template = _Template()
            except Exception:  # retried, and reported, when a worker is needed
                pass


def release() -> None:
    """A process executor has shut down: the last one stops the template."""
    global _users, _template
    with _lock:
        _users = max(_users - 1, 0)
        template = _template if _users == 0 else None
        if template is not None:
            _template = None
    if template is not None:
        template.stop()


def fork_worker(sock: socket.socket) -> None:
    """Have the template fork a worker serving ``sock``; a new template if it died."""
    global _template
    with _lock:
        for attempt in (1, 2):
            template = _template
            if template is None or not template.alive():
                if template is not None:
                    template.stop()
                    _template = None
                template = _template = _Template()
            try:
                template.fork_worker(sock)
                return
            except OSError:
                template.stop()
                _template = None
                if attempt == 2:
                    raise


def _before_fork() -> None:
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    # The parent's template is not this process's child: drop the copy of its control socket
    # (so that it still exits with the parent) and start a template of our own when needed,
    # counted by the executors the child makes (the inherited ones are the parent's).
    global _template, _lock, _users
    template, _template, _users = _template, None, 0
    if template is not None:
        try:
            template.control.close()
        except OSError:  # pragma: no cover - already closed
            pass
    _lock = threading.Lock()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


if __name__ == "__main__":
    main()
