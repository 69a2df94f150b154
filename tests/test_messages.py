"""Messages say what happened: a failed creation names the creation, truncation warnings
quote a bounded part of the value, a tracking URI without a scheme that looks like a server
address is warned about."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from scripts import script_env

from client import QueueingClient


def test_a_creation_failing_on_a_server_names_the_creation_not_the_look_up(
    mlflow_server, flaky_proxy, executor
):
    # Every request answered by a gateway's 502 ("" ends every path): the creation fails, and
    # each later attempt first looks up the run (runs/search), which fails as well.
    proxy = flaky_proxy(mlflow_server.uri, "", [502] * 1000)
    experiment_id = MlflowClient(mlflow_server.uri).create_experiment(
        f"create-fails-{time.monotonic_ns()}"
    )
    client = QueueingClient(proxy.uri, executor=executor, retry_timeout=0.5)
    try:
        run = client.create_run(experiment_id, run_name="trial-7")
        client.log_metrics(run, {"m": 1.0})
        with pytest.raises(MlflowException, match="create_run failed: creating run") as raised:
            client.flush()
        errors = client.status().runs[0].errors
    finally:
        _close(client)
    assert "trial-7" in str(raised.value)
    message = errors[0]
    said = f"create_run failed: creating run 'trial-7' in experiment {experiment_id} failed: "
    assert said in message, message
    # The creation's own error comes first; the look-up's, if any, is said to be one.
    cause = message.split(said, 1)[1]
    assert cause.index("runs/create failed with error code 502") < cause.find("runs/search") or (
        "runs/search" not in cause
    ), message
    if "runs/search" in cause:
        assert "looking up whether an earlier attempt made the run also failed" in cause, message
    assert proxy.hits >= 2


def _close(client: QueueingClient) -> None:
    try:
        client.close()
    except MlflowException:
        pass


_EXIT_SCRIPT = """
import sys
from client import QueueingClient

client = QueueingClient(sys.argv[1], retry_timeout=60, spool_dir=sys.argv[3] or None)
run = client.create_run(sys.argv[2])
client.log_metrics(run, {"loss": 1.0})
# no close(): the exit handler flushes, and gives up after RUNACTORS_EXIT_TIMEOUT seconds
"""


@pytest.mark.slow
@pytest.mark.parametrize("spool", [False, True], ids=["no spool", "spool"])
def test_the_exit_warning_says_how_long_the_flush_really_waited(
    tracking_uri, experiment_id, lock_store, tmp_path, spool
):
    # The store locked throughout: the last flush cannot complete within the 2 s bound.
    with lock_store():
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _EXIT_SCRIPT,
                tracking_uri,
                experiment_id,
                str(tmp_path / "spool") if spool else "",
            ],
            env=script_env(RUNACTORS_EXIT_TIMEOUT="2"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    said = re.search(
        r"closing before the last flush completed: it had not completed after (\S+) s "
        r"\(close waits at most (\S+) s\)",
        done.stderr,
    )
    if spool:
        # A quarter of the bound is kept for spooling, and what the flush had not sent by
        # then is spooled or reported as the round's own loss: the late flush is not one.
        assert "closing before the last flush completed" not in done.stderr, done.stderr
        assert "took longer than" not in done.stderr, done.stderr
        return
    assert said is not None, done.stderr[-3000:]
    waited, bound = float(said.group(1)), float(said.group(2))
    assert bound == 2, said.group(0)
    # What it says it waited is what it waited: the whole bound (a late wake-up at most).
    assert bound - 0.1 <= waited < bound + 1, said.group(0)


def test_a_truncation_warning_quotes_only_the_start_of_the_value(
    tracking_uri, experiment_id, store, caplog
):
    long_value = "v" * 8000 + "END"
    client = QueueingClient(tracking_uri)
    try:
        run = client.create_run(experiment_id)
        with caplog.at_level(logging.WARNING):
            client.log_params(run, {"p": long_value})
            client.set_tags(run, {"t": long_value})
        client.flush()
        run_id = run.resolve()
    finally:
        client.close()
    stored = store.get_run(run_id).data
    assert stored.params["p"].startswith("vvv") and len(stored.params["p"]) < len(long_value)
    warnings = [r.getMessage() for r in caplog.records if "Truncated the value" in r.getMessage()]
    assert len(warnings) == 2, warnings
    for message in warnings:
        assert len(message) < 300, message
        assert "v" * 100 in message and "v" * 101 not in message, message


@pytest.mark.parametrize(
    ("uri", "meant"),
    [
        ("127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("127.0.0.1:5000/", "http://127.0.0.1:5000/"),
        ("10.1.2.3:80", "http://10.1.2.3:80"),
        ("localhost", "http://localhost"),
        ("127.0.0.1", "http://127.0.0.1"),
    ],
)
def test_a_server_address_without_a_scheme_is_warned_about(
    uri, meant, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        client = QueueingClient(uri)
    client.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    message = warnings[0].getMessage()
    assert repr(meant) in message and str(tmp_path / uri.rstrip("/")) in message, message


@pytest.mark.parametrize("uri", ["mlruns", "./127.0.0.1:5000", "runs/5000", "sqlite:///x.db"])
def test_a_folder_or_database_is_not_warned_about(uri, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        client = QueueingClient(uri)
    client.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.slow
def test_status_never_counts_a_finished_round_twice(tracking_uri, experiment_id, store):
    """A round's entities move from ``queued`` (in flight) to ``logged`` at once: a status()
    taken while the run actor accounts the round sees them in one or the other, not both."""
    client = QueueingClient(tracking_uri)
    sent = 0
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            runs = client.status().runs
            if runs:
                counted = runs[0].queued["metrics"] + runs[0].logged["metrics"]
                if counted > sent:  # read after the snapshot: ``sent`` only grows
                    seen.append((counted, sent))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: hit the window
    poller = threading.Thread(target=poll, daemon=True)
    try:
        run = client.create_run(experiment_id)
        poller.start()
        for step in range(300):
            sent += 1
            client.log_metrics(run, {"m": float(step)}, step=step)
            client.flush()
    finally:
        stop.set()
        poller.join(10)
        sys.setswitchinterval(interval)
        client.close()
    assert seen == [], seen[:5]
    assert len(store.get_metric_history(run.resolve(), "m")) == 300
