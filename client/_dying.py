"""When the process dies of a signal or an uncaught exception: what its clients queued is
delivered, then every run a client created and did not terminate ends ``KILLED`` (a signal,
Ctrl-C) or ``FAILED`` (an exception), with an end time. The process still ends as it would
have. Clients with ``end_runs=False`` opt out.

Installed once per process by the first client with ``end_runs`` (:func:`install`):

- **SIGTERM, SIGHUP, and SIGINT where it is ``SIG_DFL``**: handled only where the process has
  the default disposition (looked at when the handler would be installed: a handler the
  program installed, or ``SIG_IGN``, is kept). The handler does no work where the signal
  interrupted the program (it may hold any lock there, ours, the logging module's, a
  connection pool's): it starts a thread that does the work, restores ``SIG_DFL`` (a second
  signal ends the process at once), and raises :class:`Signalled` (a ``SystemExit``) in the
  main thread, as Ctrl-C raises ``KeyboardInterrupt``, so that the program's ``finally``
  blocks and ``with`` statements unwind. The thread waits for the main thread to finish
  (up to ``RUNACTORS_EXIT_TIMEOUT``), ends the runs, delivers what is queued (the exit
  handler's delivery: ``RUNACTORS_EXIT_TIMEOUT``, spooled past it with ``spool_dir``), and
  sends the process the same signal again: the parent sees a death by that signal.
  Signal handlers can only be installed from the main thread: a client made in another
  thread installs them at its first ``create_run`` in the main thread.
- **An uncaught exception in the main thread**: :data:`sys.excepthook` (the hook the program
  had is called, and prints the traceback) ends the runs; the exit handler then delivers,
  and Python exits with status 1. With Python's own SIGINT handler, Ctrl-C takes this path:
  an uncaught ``KeyboardInterrupt`` ends the runs ``KILLED`` and Python dies of SIGINT.

Nothing else ends runs: a clean exit, and ``sys.exit(n)`` with any status (Python does not
tell exit handlers the status), leave them as they are, as MLflow's own client does.

A forked child starts without the signal handlers (a child that uses no client keeps the
default dispositions); its first client installs them again. The process executor's worker
processes never import this package.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException
from mlflow.utils.time import get_current_time_millis

from actors import RunHandle, Session, Terminate, exit_timeout, stop_at_exit
from client._registry import open_clients

if TYPE_CHECKING:
    from collections.abc import Callable

_logger = logging.getLogger("runactors.dying")

# The deadly signals handled where their disposition is SIG_DFL (SIGINT's default in Python
# is its own handler, which raises KeyboardInterrupt: that takes the exception path).
SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name)
)

_lock = threading.Lock()
_signals_checked = False  # this process's dispositions were looked at (in its main thread)
_ours: set[int] = set()  # the signals whose handler is ours
_previous_hook: Callable[[type[BaseException], BaseException, TracebackType | None], object]
_previous_hook = sys.__excepthook__
_hook_installed = False
_dying: int | None = None  # the signal this process is dying of
_interrupted = False  # an uncaught KeyboardInterrupt ends this process


class Signalled(SystemExit):
    """Raised in the main thread by a deadly signal (SIGTERM, SIGHUP, SIGINT where they had
    the default disposition), so that the program unwinds before the process dies of it."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"the process got {signal.Signals(self.signum).name}"


def install() -> None:
    """Install the exit hook and, from the main thread, the signal handlers; once per
    process, by every client with ``end_runs`` (its construction, its ``create_run``)."""
    global _signals_checked, _hook_installed, _previous_hook
    if _signals_checked and _hook_installed:
        return
    with _lock:
        if not _hook_installed:
            _previous_hook = sys.excepthook  # the program's hook, if it set one: called first
            sys.excepthook = _excepthook
            atexit.register(_after_exit)  # before the exit handler's delivery: runs after it
            _hook_installed = True
        if _signals_checked or threading.current_thread() is not threading.main_thread():
            return
        _signals_checked = True
        for signum in SIGNALS:
            try:
                if signal.getsignal(signum) == signal.SIG_DFL:  # never replace the program's
                    signal.signal(signum, _on_signal)
                    _ours.add(signum)
            except (OSError, ValueError):  # pragma: no cover - a subinterpreter, say
                _logger.debug("could not handle signal %s", signum, exc_info=True)


def keeps_queued(exc: BaseException | None) -> bool:
    """Whether ``with client:`` left by ``exc`` keeps what the client queued instead of
    dropping it: the process is dying of a signal or Ctrl-C, and delivers it."""
    return isinstance(exc, Signalled | KeyboardInterrupt)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The handler of a deadly signal: hand the work to a thread, unwind the main thread."""
    global _dying
    if _dying is not None:
        return  # dying already: that delivery bounds the end
    _dying = signum
    try:
        signal.signal(signum, signal.SIG_DFL)  # the same signal again ends the process now
    except (OSError, ValueError):  # pragma: no cover
        pass
    # Not a daemon: the interpreter, once the main thread has unwound, waits for it.
    helper = threading.Thread(target=_die_of, args=(signum,), name="runactors-dying")
    try:
        helper.start()
    except RuntimeError:  # pragma: no cover - no thread now: the exit handler delivers
        pass
    if threading.main_thread().is_alive():
        raise Signalled(signum)
    # Else the program has ended: the interpreter waits for its other threads (which the
    # thread ends now, as the signal would have) or runs its exit handlers (it waits for them).


def _die_of(signum: int) -> None:
    """Once the main thread has unwound: end the runs, deliver, die of ``signum``."""
    try:
        threading.main_thread().join(exit_timeout())  # its finally blocks run first
        ended = end_runs("KILLED")
        stop_at_exit()  # closes every client: delivers, or spools past the bound
        _report(ended, signal.Signals(signum).name)
    except BaseException:  # pragma: no cover - the process dies of the signal anyway
        _logger.exception("ending the runs at %s failed", signal.Signals(signum).name)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # closed, or None
                pass
        os.kill(os.getpid(), signum)  # SIG_DFL again: the process dies of it here
        time.sleep(1.0)  # pragma: no cover - only if the signal is blocked everywhere
        os._exit(128 + signum)  # pragma: no cover


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, traceback: TracebackType | None
) -> object:
    """``sys.excepthook``: an exception that ended the main thread ends the runs (after the
    program's hook, which prints the traceback); the exit handler delivers them next."""
    global _interrupted
    try:
        _previous_hook(exc_type, exc, traceback)
    finally:
        if _uncaught():
            _interrupted = issubclass(exc_type, KeyboardInterrupt)
            try:
                end_runs("KILLED" if _interrupted else "FAILED")
            except Exception:  # pragma: no cover - never hide the program's own error
                _logger.exception("ending the runs after an uncaught exception failed")
    return None


def _after_exit() -> None:
    """After the exit handler's delivery: a process that an uncaught ``KeyboardInterrupt``
    ends dies of SIGINT, as Python makes it. CPython forgets that it should whenever any
    thread runs ``exec`` or ``eval`` of a string (it clears its flag there), as the store's
    code on our flush threads may meanwhile; running one that raises sets it again."""
    if not _interrupted:
        return
    stop_at_exit()  # normally done already (the exit handler runs first): then it returns
    try:
        exec("raise KeyboardInterrupt")  # sets CPython's "unhandled KeyboardInterrupt" flag
    except KeyboardInterrupt:
        pass


def _uncaught() -> bool:
    """Whether the hook reports an exception that ends the program: called by the interpreter
    once no frame of the program is left (only hooks: the program's may call ours), not by a
    framework that reports an exception from inside the program and goes on, nor at the
    prompt of an interactive interpreter, which goes on too."""
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    frame: FrameType | None = sys._getframe(1)  # _excepthook's
    while frame is not None:
        code = frame.f_code
        if code.co_name == "<module>" or os.path.basename(code.co_filename) == "runpy.py":
            return False  # a module (or ``python -m``) is still running
        frame = frame.f_back
    return True


def end_runs(status: str) -> list[RunHandle]:
    """Queue ``status`` (with an end time, now) for every run that a client with ``end_runs``
    created and did not terminate; return those runs. Queued after everything the run
    queued, so the exit's delivery sends it last."""
    from client._client import QueueingClient

    end_time = get_current_time_millis()
    ended: list[RunHandle] = []
    for client in open_clients():
        if isinstance(client, QueueingClient) and client._config.end_runs:
            session = client._session
            if session is not None:
                ended += end_session_runs(session, status, end_time)
    return ended


def end_session_runs(session: Session, status: str, end_time: int) -> list[RunHandle]:
    """:func:`end_runs` for one client's session."""
    ended = []
    for handle in list(session.handles.values()):
        if handle.pending is None or handle.queues.terminate_queued:
            continue  # not created by this client, or terminated by it
        if handle.record.run_id is None and handle.pending.done():
            continue  # its creation failed, or was dropped: there is no run
        try:
            if handle.queues.set_terminate(Terminate(status, end_time)):
                ended.append(handle)
        except MlflowException:  # the client is closing: its close() delivers what it has
            continue
    return ended


def _report(ended: list[RunHandle], why: str) -> None:
    """Say what became of the runs ended at ``why``: a run whose creation did not reach the
    store within the exit bound is lost (or in the spool, ended when it is replayed)."""
    for handle in ended:
        record = handle.record
        if record.run_id is not None:
            continue
        spooled = record.state == "spooled" or any(record.spooled.values())
        _logger.warning(
            "%s: the run %s was not created before the process died (the store did not take "
            "it within RUNACTORS_EXIT_TIMEOUT, %s s): %s",
            why,
            record.label,
            f"{exit_timeout():g}",
            "it is in the spool with its operations and its end (KILLED), for runactors replay"
            if spooled
            else "it and its operations are lost",
        )


def _after_fork_in_child() -> None:
    """A forked child keeps no handler of ours (one that uses no client dies of SIGTERM as
    before); its first client installs them again. The exit hook stays: it ends only the
    runs of the child's own clients."""
    global _signals_checked, _dying, _lock, _interrupted
    _lock = threading.Lock()  # another thread may have held it at fork time
    _dying, _interrupted = None, False
    for signum in list(_ours):
        try:
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):  # pragma: no cover
            pass
    _ours.clear()
    _signals_checked = False


os.register_at_fork(after_in_child=_after_fork_in_child)
