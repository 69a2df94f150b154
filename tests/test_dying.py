"""When the process dies (issue 16, signals and exceptions): a child logging two runs under
load is signalled (SIGTERM, SIGINT, SIGHUP) or raises; every step it reported logged is in
the store, its runs end KILLED or FAILED with an end time, and it still dies as it would
have. A handler of the program's own is kept; a clean exit and ``end_runs=False`` leave the
runs as they are. The child and the read-back are in ``tests/dying.py``."""

from __future__ import annotations

import os
import signal

import pytest
from dying import Death, die

from client import QueueingClient

slow = pytest.mark.slow  # the test runs a program to its death

# A signal that comes before the first background flush (flush_interval=5: nothing was sent,
# not even the runs' creation) or between them (0.2).
# SIGHUP comes to a service whose main thread has ended: the work goes on in its threads.
SIGNALS = [
    pytest.param(signal.SIGTERM, 5.0, "run", id="SIGTERM"),
    pytest.param(signal.SIGINT, 0.2, "run", id="SIGINT"),
    pytest.param(signal.SIGHUP, 0.2, "service", id="SIGHUP-service"),
]


def _assert_all_delivered(death: Death) -> None:
    assert death.last_step >= 0, death.stderr
    assert len(death.runs) == 2, (death.runs, death.stderr)
    for run in death.runs:
        assert run.lost == 0, (run, death.last_step, death.stderr)
        assert run.duplicates == 0, run


@slow
@pytest.mark.parametrize(("signum", "flush_interval", "how"), SIGNALS)
def test_a_signal_delivers_everything_and_ends_the_runs_killed(
    tracking_uri, experiment_id, executor, signum, flush_interval, how
):
    death = die(
        tracking_uri,
        experiment_id,
        executor,
        how,
        signum=signum,
        flush_interval=flush_interval,
        DYING_WITH="1",  # inside ``with client:``, which the signal's exception leaves
    )
    assert death.returncode == -signum, death.stderr  # died of that signal, as it would have
    _assert_all_delivered(death)
    for run in death.runs:
        assert run.status == "KILLED", (run, death.stderr)
        assert run.end_time, run


@slow
def test_an_uncaught_exception_ends_the_runs_failed(tracking_uri, experiment_id, executor):
    death = die(tracking_uri, experiment_id, executor, "raise", after_steps=300)
    assert death.returncode == 1, death.stderr
    assert "Traceback (most recent call last)" in death.stderr
    assert "RuntimeError: boom at step 300" in death.stderr
    assert death.last_step == 300
    _assert_all_delivered(death)
    for run in death.runs:
        assert run.status == "FAILED", (run, death.stderr)
        assert run.end_time, run


@slow
def test_the_programs_own_handler_is_kept(tracking_uri, experiment_id):
    # Installed before the client: the client leaves it; it stops the loop, the program
    # exits cleanly, and its runs are the program's to end.
    death = die(tracking_uri, experiment_id, "thread", "own-handler", signum=signal.SIGTERM)
    assert death.returncode == 0, death.stderr
    assert "own handler ran" in death.stdout and "clean end" in death.stdout
    _assert_all_delivered(death)
    assert [run.status for run in death.runs] == ["RUNNING", "RUNNING"]


@slow
def test_a_clean_exit_leaves_the_runs_running(tracking_uri, experiment_id):
    # As MLflow's client. (So does sys.exit(n), whose status Python does not tell the exit
    # handlers: the same path, see docs/operations.md.)
    death = die(tracking_uri, experiment_id, "thread", "exit-0", after_steps=100)
    assert death.returncode == 0, death.stderr
    _assert_all_delivered(death)
    assert [(run.status, run.end_time) for run in death.runs] == [("RUNNING", None)] * 2


@slow
def test_end_runs_false_leaves_the_runs_running(tracking_uri, experiment_id):
    death = die(
        tracking_uri,
        experiment_id,
        "thread",
        "run",
        signum=signal.SIGTERM,
        DYING_END_RUNS="0",
        DYING_FLUSH_FIRST="1",
    )
    assert death.returncode == -signal.SIGTERM, death.stderr
    assert [(run.status, run.end_time) for run in death.runs] == [("RUNNING", None)] * 2


def test_a_forked_child_keeps_the_default_disposition(tracking_uri):
    # This process has a client with end_runs, so our handler is SIGTERM's here (the test
    # process's main thread); a forked child that uses no client dies of SIGTERM at once.
    from client import _dying

    QueueingClient(tracking_uri).close()
    if signal.getsignal(signal.SIGTERM) is not _dying._on_signal:
        pytest.skip("the test process has a SIGTERM handler of its own")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            os._exit(3)
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status


def test_ctrl_c_in_a_with_block_keeps_what_is_queued(tracking_uri, experiment_id, store):
    # Any other exception drops it (the seed's contract); KeyboardInterrupt (and a deadly
    # signal's SystemExit) is the process dying: what it queued is delivered.
    client = QueueingClient(tracking_uri)
    with pytest.raises(KeyboardInterrupt), client:
        run = client.create_run(experiment_id)
        client.log_metrics(run, {"m": 1.0}, step=7)
        raise KeyboardInterrupt
    client.close()
    assert [m.step for m in store.get_metric_history(run.resolve(timeout=0), "m")] == [7]
