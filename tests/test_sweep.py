"""``runactors sweep`` end to end: real trials in spawned workers, read back from the store."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from rich.console import Console
from stores import SqliteLock

from client import QueueingClient
from client._cli import main
from client.sweep.board import Board
from client.sweep.data import load_digits
from client.sweep.delivery import DeliveryClock
from client.sweep.live import render
from client.sweep.messages import Progress, Snapshot, TrialResult
from client.sweep.options import BATCH_SIZE, DEFAULT_EXPERIMENT, SWEEP_TAG, TRIAL_TAG
from client.sweep.plain import PlainView
from client.sweep.store import resolve_tracking_uri
from client.sweep.view import choose_view

pytestmark = pytest.mark.slow  # each test runs the sweep command or its trial processes


EXPECTED_METRICS = ("train_accuracy", "val_accuracy", "val_loss")


def sweep(*args: str) -> Result:
    """Invoke ``runactors sweep ARGS`` in this process."""
    return CliRunner().invoke(main, ["sweep", *args])


def store_copy(tmp_path: Path, template_db: Path) -> str:
    """A fresh, already migrated SQLite store in ``tmp_path`` (saves the schema creation)."""
    db = tmp_path / "m.db"
    shutil.copy(template_db, db)
    return f"sqlite:///{db}"


def sweep_runs(uri: str) -> tuple[Run, list[Run]]:
    """The sweep's parent run and its child runs, in trial order."""
    store = MlflowClient(uri)
    experiment = store.get_experiment_by_name(DEFAULT_EXPERIMENT)
    assert experiment is not None
    runs = store.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get(SWEEP_TAG) == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, sorted(children, key=lambda run: int(run.data.tags[TRIAL_TAG]))


def history_length(uri: str, run: Run, key: str) -> int:
    return len(MlflowClient(uri).get_metric_history(run.info.run_id, key))


def assert_complete_trial(uri: str, run: Run, epochs: int) -> None:
    """A FINISHED trial with its params, both dataset inputs and every epoch's metrics."""
    assert run.info.status == "FINISHED"
    assert {"loss", "alpha", "learning_rate", "eta0", "epochs", "seed"} <= set(run.data.params)
    assert run.data.params["epochs"] == str(epochs)
    names = {item.dataset.name for item in run.inputs.dataset_inputs}
    assert names == {"digits-train", "digits-val"}
    for key in EXPECTED_METRICS:
        history = MlflowClient(uri).get_metric_history(run.info.run_id, key)
        assert sorted(metric.step for metric in history) == list(range(epochs))


@pytest.mark.slow
def test_sweep_logs_every_trial_as_a_child_run(tmp_path: Path, template_db: Path) -> None:
    uri = store_copy(tmp_path, template_db)
    result = sweep("--trials", "3", "--epochs", "2", "--workers", "2", "--tracking-uri", uri)

    assert result.exit_code == 0, result.output
    parent, children = sweep_runs(uri)
    assert len(children) == 3
    for run in children:
        assert_complete_trial(uri, run, epochs=2)
        assert run.info.run_name == f"trial-{run.data.tags[TRIAL_TAG]}"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_finished"] == 3
    assert parent.data.metrics["metric_points"] == 3 * 2 * len(EXPECTED_METRICS)

    best = max(children, key=lambda run: run.data.metrics["val_accuracy"])
    assert f"best trial: trial {best.data.tags[TRIAL_TAG]} " in result.stdout
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert "metric points logged: 18 " in result.stdout
    assert "failures: 0" in result.stdout
    assert f"mlflow ui --backend-store-uri {uri}" in result.stdout
    assert "epoch 2" in result.stdout  # progress lines


@pytest.mark.slow
def test_a_failing_trial_ends_failed_and_the_others_carry_on(
    tmp_path: Path, template_db: Path
) -> None:
    uri = store_copy(tmp_path, template_db)
    result = sweep(
        *("--trials", "3", "--epochs", "3", "--workers", "2", "--tracking-uri", uri),
        *("--fail-trial", "2"),
    )

    assert result.exit_code == 0, result.output
    parent, children = sweep_runs(uri)
    failed = children[1]
    assert failed.info.status == "FAILED"
    assert history_length(uri, failed, "val_accuracy") == 1  # it failed at its second epoch
    for run in (children[0], children[2]):
        assert_complete_trial(uri, run, epochs=3)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_failed"] == 1
    assert "trial 2/3 FAILED" in result.stdout
    assert "failures: 1" in result.stdout
    assert "RuntimeError: forced failure of trial 2" in result.stdout


@pytest.mark.slow
def test_the_command_creates_mlflow_db_in_the_current_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    completed = subprocess.run(
        [sys.executable, "-m", "client._cli", "sweep", "--trials", "2", "--epochs", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").is_file()
    _, children = sweep_runs(uri)
    assert len(children) == 2
    for run in children:
        assert_complete_trial(uri, run, epochs=2)
    assert f"mlflow ui --backend-store-uri {uri}" in completed.stdout


class Terminal:
    """``runactors sweep`` run as from a terminal: the leader of its own process group, so that
    a Ctrl-C (SIGINT to the group, as a terminal sends it) reaches every process it started,
    workers included; its output read line by line as it comes."""

    def __init__(self, uri: str, *args: str) -> None:
        out_read, self._out_write = os.pipe()
        err_read, err_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client._cli", "sweep", "--tracking-uri", uri, *args],
            stdout=self._out_write,
            stderr=err_write,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(err_write)
        self._out = os.fdopen(out_read, "r")  # read here, in the test's thread, on demand
        self._err: list[str] = []
        self._err_reader = threading.Thread(target=self._read_err, args=(err_read,))
        self._err_reader.start()
        self.stdout: list[str] = []
        self._filler: threading.Thread | None = None

    def _read_err(self, fd: int) -> None:
        with os.fdopen(fd, "r") as err:
            self._err.extend(err)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def read_until(self, predicate: Callable[[str], bool], timeout: float = 180) -> str:
        """Read output lines until one satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self._out], [], [], 0.5)[0]:
                assert self.process.poll() is None, self.stderr
                continue
            line = self._out.readline()
            assert line, f"the sweep ended first:\n{''.join(self.stdout)}{self.stderr}"
            self.stdout.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no such line in time:\n{''.join(self.stdout)}")

    def pause_output(self) -> None:
        """Stop reading and fill the pipe, as Ctrl-S pauses a terminal: the sweep's next line
        then blocks until the output is read again."""
        fd = os.dup(self._out_write)  # the filler's own: closed when it is done

        def fill() -> None:  # whole lines of PIPE_BUF bytes: atomic, never mixed with its own
            try:
                for _ in range(64):
                    os.write(fd, b"\n".join([b"x" * 63] * 64) + b"\n")
            finally:
                os.close(fd)

        self._filler = threading.Thread(target=fill)
        self._filler.start()

    def interrupt(self) -> int:
        """Press Ctrl-C; return how many output lines had been read by then."""
        os.killpg(self.process.pid, signal.SIGINT)
        return len(self.stdout)

    def finish(self, timeout: float) -> int:
        """Read the rest of the output; the exit status, within ``timeout`` seconds."""
        os.close(self._out_write)
        self._out_write = -1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self._out], [], [], 0.5)[0]:
                line = self._out.readline()
                if not line:
                    break
                if line.strip("x\n"):  # not the filler
                    self.stdout.append(line)
        try:
            return self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {timeout} s later:\n{''.join(self.stdout)}{self.stderr}"
            ) from None

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self._out_write >= 0:
            os.close(self._out_write)
        if self._filler is not None:
            while self._filler.is_alive() and select.select([self._out], [], [], 1)[0]:
                if not self._out.read(65536):
                    break
            self._filler.join(5)
        self._out.close()
        self._err_reader.join(10)

    def group(self) -> list[str]:
        """The live (not zombie) processes still in the sweep's process group."""
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            state, _, group = text.rpartition(")")[2].split()[:3]
            if int(group) == self.process.pid and state != "Z":
                members.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
        return members

    def spawned_workers(self) -> list[str]:
        return [cmd for cmd in self.group() if "multiprocessing.spawn" in cmd]


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    started: list[Terminal] = []

    def start(uri: str, *args: str) -> Terminal:
        started.append(Terminal(uri, *args))
        return started[-1]

    yield start
    for each in started:
        each.close()


def wait_until(condition: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# Ctrl-C must end the sweep within a few seconds; the bound is generous for a loaded machine.
EXIT_BOUND_SECONDS = 45
STARTED = re.compile(r"trial (\d+)/\d+ started: run (\w+)")
NOT_STARTED = re.compile(r"trial (\d+)/\d+ KILLED .*: not started$")
INTERRUPTED = re.compile(
    r"interrupted: no new trial starts \(\d+ not started\); "
    r"(?:stopping the running trial\(s\): ([\d, ]+)|no trial is running)"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("moment", "executor"),
    [
        ("worker start-up", "thread"),
        ("worker start-up", "process"),
        ("mid-trial", "thread"),
        ("mid-trial", "process"),
        ("summary", "thread"),
    ],
)
def test_ctrl_c_at_any_moment_ends_the_sweep_killed(
    moment: str,
    executor: str,
    tmp_path: Path,
    template_db: Path,
    terminal: Callable[..., Terminal],
) -> None:
    uri = store_copy(tmp_path, template_db)
    if moment == "summary":  # a short sweep, paused (Ctrl-S) as its last trial ends
        sweep = terminal(uri, "--trials", "2", "--epochs", "2", "--executor", executor)
        ended = re.compile(r"trial \d+/2 (FINISHED|FAILED|KILLED)")
        sweep.read_until(ended.search)
        sweep.read_until(ended.search)
        sweep.pause_output()
        time.sleep(1)  # the parent ends its run and blocks writing the summary
    else:
        sweep = terminal(uri, "--trials", "4", "--epochs", "1000000", "--executor", executor)
        sweep.read_until(lambda line: line.startswith("sweep: "))
        if moment == "worker start-up":  # its interpreter is importing for seconds
            assert wait_until(sweep.spawned_workers, timeout=60), sweep.group()
        else:
            sweep.read_until(lambda line: " epoch " in line)
    read_before = sweep.interrupt()
    signalled = time.monotonic()
    status = sweep.finish(timeout=EXIT_BOUND_SECONDS)
    took = time.monotonic() - signalled

    output = "".join(sweep.stdout)
    assert status == 130, output + sweep.stderr
    assert took < EXIT_BOUND_SECONDS
    assert "Aborted!" in sweep.stderr
    assert "Traceback" not in sweep.stderr, sweep.stderr
    assert wait_until(lambda: not sweep.group(), timeout=30), sweep.group()  # no leftovers
    parent, children = sweep_runs(uri)
    if moment == "summary":  # every trial had ended before the Ctrl-C
        assert [run.info.status for run in [parent, *children]] == ["FINISHED"] * 3
        return
    assert parent.info.status == "KILLED"
    assert {run.info.status for run in children} <= {"KILLED"}
    # No trial starts after the interrupted line but the ones it names as running (handed
    # out just before, a worker may report one a moment later); the only other runs are those
    # of trials whose run was being created, which end without starting.
    lines = sweep.stdout
    (stop_at,) = [i for i, line in enumerate(lines) if "interrupted:" in line]
    assert stop_at >= read_before
    match = INTERRUPTED.search(lines[stop_at])
    assert match, lines[stop_at]
    running = {int(n) for n in (match.group(1) or "").replace(",", " ").split()}
    started = {int(m.group(1)): m.group(2) for m in map(STARTED.search, lines) if m}
    started_before = {int(m.group(1)) for m in map(STARTED.search, lines[:stop_at]) if m}
    assert set(started) <= started_before | running, output
    not_started = {int(m.group(1)) for m in map(NOT_STARTED.search, lines[stop_at:]) if m}
    trials = {int(run.data.tags[TRIAL_TAG]): run.info.run_id for run in children}
    assert set(trials) <= set(started) | not_started, output
    assert all(trials[n] == run_id for n, run_id in started.items()), output
    if moment == "mid-trial":
        assert children and running


@pytest.mark.slow
def test_a_second_ctrl_c_kills_trials_that_cannot_stop(
    tmp_path: Path, template_db: Path, terminal: Callable[..., Terminal]
) -> None:
    uri = store_copy(tmp_path, template_db)
    sweep = terminal(uri, "--trials", "4", "--epochs", "1000000")
    sweep.read_until(lambda line: " epoch " in line)
    with SqliteLock(tmp_path / "m.db"):  # the trials' final flush now waits on the store
        sweep.interrupt()
        sweep.read_until(lambda line: "interrupted:" in line)
        time.sleep(1)
        sweep.interrupt()  # the second Ctrl-C: kill them
        assert wait_until(lambda: not sweep.spawned_workers(), timeout=EXIT_BOUND_SECONDS)
    status = sweep.finish(timeout=EXIT_BOUND_SECONDS)

    output = "".join(sweep.stdout)
    assert status == 130, output + sweep.stderr
    assert "Traceback" not in sweep.stderr, sweep.stderr
    assert "killed: the sweep was interrupted" in output
    assert wait_until(lambda: not sweep.group(), timeout=30), sweep.group()
    parent, children = sweep_runs(uri)
    assert children
    statuses = {run.info.run_name: run.info.status for run in [parent, *children]}
    assert set(statuses.values()) == {"KILLED"}, (statuses, output)  # by the parent


@pytest.mark.slow
def test_a_worker_that_dies_fails_its_trial_alone(
    tmp_path: Path, template_db: Path, terminal: Callable[..., Terminal]
) -> None:
    uri = store_copy(tmp_path, template_db)
    sweep = terminal(uri, "--trials", "3", "--epochs", "150", "--workers", "2")
    line = sweep.read_until(STARTED.search)
    victim = int(line.rpartition("worker pid ")[2].rstrip(")\n"))
    trial = int(line.partition("trial ")[2].partition("/")[0])
    sweep.read_until(lambda text: f"trial {trial}/3 epoch " in text)
    os.kill(victim, signal.SIGKILL)  # as the OOM killer would
    status = sweep.finish(timeout=300)

    output = "".join(sweep.stdout)
    assert status == 0, output + sweep.stderr
    assert f"trial {trial}/3 FAILED" in output
    assert "its worker process died (exit code -9)" in output
    parent, children = sweep_runs(uri)
    assert parent.info.status == "FINISHED"
    assert len(children) == 3
    for run in children:
        if int(run.data.tags[TRIAL_TAG]) == trial:
            assert run.info.status == "FAILED"  # terminated by the parent
        else:
            assert_complete_trial(uri, run, epochs=150)  # the others carried on


def test_the_console_script_runs_the_same_command() -> None:
    script = shutil.which("runactors")
    if script is None:
        pytest.skip("the runactors console script is not installed")
    completed = subprocess.run(
        [script, "sweep", "--help"], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    assert "--trials" in completed.stdout
    assert "--fail-trial" not in completed.stdout  # hidden


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trials", "0"], "Invalid value for '--trials'"),
        (["--epochs", "-1"], "Invalid value for '--epochs'"),
        (["--workers", "0"], "Invalid value for '--workers'"),
        (["--tracking-uri", "nonsense://x"], "no store for the scheme 'nonsense'"),
        (["--tracking-uri", "http://127.0.0.1:1"], "Cannot use the tracking store"),
        (["--tracking-uri", "sqlite:////proc/nope/m.db"], "cannot create its folder /proc/nope"),
        (["--tracking-uri", "sqlite://"], "in-memory SQLite store"),
    ],
)
def test_user_mistakes_end_in_one_line(args: list[str], message: str) -> None:
    saved = dict(os.environ)
    result = sweep(*args)

    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert dict(os.environ) == saved  # the fail-fast HTTP settings were put back


def test_relative_sqlite_paths_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///a/m.db") == f"sqlite:///{tmp_path / 'a' / 'm.db'}"
    assert resolve_tracking_uri("sqlite:////x/m.db?timeout=5") == "sqlite:////x/m.db?timeout=5"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# -- the views ----------------------------------------------------------------------------


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of the run actors' table in rendered text, by trial name."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0].startswith("trial-"):
            rows[cells[0]] = cells
    return rows


def test_the_live_view_shows_every_run_actor(tracking_uri: str, experiment_id: str) -> None:
    """Rendered from a real client's status, as a worker sends it, to a fixed-size console."""
    store = MlflowClient(tracking_uri)
    ids = [store.create_run(experiment_id).info.run_id for _ in range(3)]  # as the parent does
    with QueueingClient(tracking_uri) as client:  # as a worker logs: by run ID
        for step in range(4):
            client.log_metrics(ids[0], {"a": 1.0, "b": 2.0}, step=step)
        client.log_metrics(ids[1], {"a": 1.0}, step=0)
        client.set_terminated(ids[0], "FINISHED")
        client.flush()
        client.log_metrics(ids[2], {"a": 1.0, "b": 2.0, "c": 3.0}, step=0)  # queued only
        assert wait_until(lambda: client.status().runs[0].state == "stopped", timeout=30)
        status = client.status().to_dict()

    board = Board(trials=3, epochs=4)
    for trial, run_id in enumerate(ids, start=1):
        board.progress(Progress(trial, run_id, pid=4242))
    board.progress(Progress(1, ids[0], epoch=3))
    board.progress(Progress(2, ids[1], epoch=0))
    board.snapshot(Snapshot(4242, status, delivery_seconds=0.5, call_seconds=0.01))
    board.result(TrialResult(1, ids[0], "FINISHED", {}, {}, 8, 1.0))
    console = Console(record=True, width=120, force_terminal=True)
    console.print(render(board))
    text = console.export_text()

    assert "trials 1/3   epochs 5/12   points logged 9 " in text
    rows = table_rows(text)
    assert list(rows) == ["trial-1", "trial-2", "trial-3"]
    logged = {run["run_id"]: str(sum(run["logged"].values())) for run in status["runs"]}
    #                     trial      epochs  status      state      queued logged errors
    assert rows["trial-1"][:7] == [
        "trial-1",
        "4/4",
        "FINISHED",
        "stopped",
        "0",
        logged[ids[0]],
        "0",
    ]
    assert rows["trial-2"][:7] == ["trial-2", "1/4", "running", "idle", "0", logged[ids[1]], "0"]
    assert rows["trial-3"][:7] == ["trial-3", "0/4", "running", "idle", "3", "0", "0"]
    assert int(logged[ids[0]]) >= 8 and int(logged[ids[1]]) >= 1
    assert all(row[7].startswith("pid 4242") for row in rows.values())


def test_without_a_terminal_the_plain_lines_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under pytest stdout is not a terminal; CI=true and --plain choose plain lines too."""
    monkeypatch.delenv("CI", raising=False)
    assert isinstance(choose_view(False, print), PlainView)
    assert isinstance(choose_view(True, print), PlainView)
    monkeypatch.setenv("CI", "true")
    assert isinstance(choose_view(False, print), PlainView)


def run_in_a_terminal(uri: str, env: dict[str, str], *args: str) -> tuple[int, str]:
    """``runactors sweep`` with a pseudo-terminal as its stdout and stderr; its exit status
    and everything it wrote."""
    main_fd, child_fd = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "client._cli", "sweep", "--tracking-uri", uri, *args],
        stdin=subprocess.DEVNULL,
        stdout=child_fd,
        stderr=child_fd,
        env=env,
    )
    os.close(child_fd)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        status = process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(main_fd)
    return status, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("ci", [False, True], ids=["terminal", "CI"])
def test_in_a_terminal_the_sweep_shows_its_actors_live(
    ci: bool, tmp_path: Path, template_db: Path
) -> None:
    uri = store_copy(tmp_path, template_db)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "FORCE_COLOR", "NO_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS="140", LINES="40", **({"CI": "true"} if ci else {}))
    status, output = run_in_a_terminal(uri, env, "--trials", "2", "--epochs", "2")
    output = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)  # colours, cursor moves

    assert status == 0, output
    assert "Traceback" not in output
    if ci:  # today's plain lines
        assert "trial 1/2 epoch 2" in output and "trial 2/2 FINISHED" in output
        assert "run actors" not in output and "metric points logged: 12 " in output
        return
    assert "run actors" in output and "sweep summary" in output
    assert " epoch 2  train_accuracy" not in output  # no plain progress lines
    final = output.rpartition("run actors")[2]  # the last frame drawn, then the summary
    rows = table_rows(final)
    assert sorted(rows) == ["trial-1", "trial-2"], final
    for row in rows.values():
        assert row[1:4] == ["2/2", "FINISHED", "stopped"], row
    assert re.search(r"metric points logged\s*│\s*12 by 2 trial runs", final), final


@pytest.mark.slow
def test_log_every_batch_logs_each_mini_batch_and_the_summary_counts_the_store(
    tmp_path: Path, template_db: Path
) -> None:
    uri = store_copy(tmp_path, template_db)
    result = sweep(*("--trials", "2", "--epochs", "2", "--tracking-uri", uri, "--log-every-batch"))

    assert result.exit_code == 0, result.output
    parent, children = sweep_runs(uri)
    batches = -(-len(load_digits().y_train) // BATCH_SIZE)
    store = MlflowClient(uri)
    points = 0
    for run in children:
        assert_complete_trial(uri, run, epochs=2)
        assert run.data.params["batch_size"] == str(BATCH_SIZE)
        for key in ("batch_accuracy", "batch_loss"):
            history = store.get_metric_history(run.info.run_id, key)
            assert sorted(metric.step for metric in history) == list(range(2 * batches))
        points += sum(
            len(store.get_metric_history(run.info.run_id, key)) for key in run.data.metrics
        )
    assert points == 2 * 2 * (len(EXPECTED_METRICS) + 2 * batches)  # more than 2 x 2 x 3
    # The summary's figures are the store's.
    assert f"metric points logged: {points} by 2 trial runs" in result.stdout
    assert parent.data.metrics["metric_points"] == points
    delivery = re.search(r"delivery: ([\d.]+) s from flush to acknowledged", result.stdout)
    assert delivery, result.stdout
    # The summary prints two decimals: the metric is within half a hundredth of it.
    printed = float(delivery.group(1))
    assert parent.data.metrics["delivery_seconds"] == pytest.approx(printed, abs=0.0051)
    assert float(delivery.group(1)) > 0
    assert "tracking calls in the training loops: " in result.stdout


def test_delivery_time_counts_overlapping_flushes_once(
    tracking_uri: str, experiment_id: str
) -> None:
    """Two runs' flushes wait together on a locked store: the client was delivering for at
    least the time the lock was held, and for no longer than from the first flush to the
    last acknowledgement (a sum of the two, each over a second and overlapping, would be)."""
    store = MlflowClient(tracking_uri)
    ids = [store.create_run(experiment_id).info.run_id for _ in range(2)]
    clock = DeliveryClock()
    with QueueingClient(tracking_uri, max_workers=2, retry_timeout=60) as client:
        with SqliteLock(Path(tracking_uri.removeprefix("sqlite:///"))):
            started = time.perf_counter()
            for run_id in ids:
                client.log_metrics(run_id, {"a": 1.0}, step=0)
                clock.flush(client)  # both outstanding while the store is locked
            time.sleep(1.0)
        assert wait_until(lambda: clock.outstanding == 0, timeout=60)
        span = time.perf_counter() - started
        assert [run.logged["metrics"] for run in client.status().runs] == [1, 1]

    assert 1.0 <= clock.seconds <= span
    assert clock.startup_seconds == pytest.approx(clock.seconds)  # one busy interval
