"""The keeper: a process with ``spool_dir`` that dies without closing (SIGKILL, ``os._exit``)
leaves its journal delivered and its runs ended ``KILLED``, within seconds, and no process
behind; a clean close lets the keeper go at once; a keeper killed is restarted; with the
store down too, the keeper leaves the work to ``runactors replay``.

Real processes: the client runs in a child of ``tests/subreaper.py`` (which adopts and reaps
what the child orphans, and says what was left), the store is a real SQLite file or the
session's ``mlflow server`` behind a proxy that can answer 503 to everything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from liveness import running
from mlflow.tracking import MlflowClient
from scripts import REPO, script_env
from servers import FORWARD, Action, MlflowServer, Proxy

from actors import spool_files
from client import QueueingClient

pytestmark = pytest.mark.slow

SUBREAPER = str(Path(__file__).with_name("subreaper.py"))
ENDED_WITHIN = 10.0  # seconds from the death to every run ended (the contract's goal)

# The client process. Phase 1: runs A, B, C created; A and B logged steps and flushed (stored);
# B terminated FINISHED. Phase 2 (once the file ``down`` exists, the store then answering 503):
# A logs more and D is created and logged, all spooled. Then it logs A's steps on and on,
# flushed every few steps, saying how far the store has them, until it is killed (or, past
# step 30, ends with os._exit: before that, it kills its keeper, whose replacement must then
# know all of the above; or, die "children", ends as a Ray worker does: it SIGKILLs every
# process whose parent it is, found in /proc, then ends with os._exit).
CHILD = """
import json, os, sys, time
from pathlib import Path
from client import QueueingClient
try:
    from actors.keeper import LINK
except ImportError:  # a runactors without a keeper (the test then fails on what it checks)
    LINK = None

cfg = json.loads(sys.argv[1])
work = Path(cfg["work"])
client = QueueingClient(cfg["uri"], executor=cfg["executor"], spool_dir=cfg["spool"],
                        retry_timeout=cfg["retry_timeout"])
exp = cfg["experiment_id"]
a, b, c = (client.create_run(exp, run_name=name) for name in "ABC")
for step in range(10):
    client.log_metrics(a, {"m": float(step)}, step=step)
    client.log_metrics(b, {"m": float(step)}, step=step)
client.set_terminated(b, "FINISHED")
client.flush()
keeper = LINK and LINK.pid
if cfg["die"] == "os._exit" and keeper:  # its keeper killed first: the new one must do
    os.kill(keeper, 9)
    while client.status().keeper != "restarted":
        time.sleep(0.01)
    keeper = LINK.pid
    time.sleep(2)  # a keeper that has lived a moment: its imports made (RUNACTORS_KEEPER_WARMUP)
say = lambda **kw: print(json.dumps({"pid": os.getpid(), "keeper": keeper, **kw}), flush=True)
step = 10
if cfg["phase2"]:
    say(phase=1)
    while not (work / "down").exists():
        time.sleep(0.02)
    for step in range(10, 20):
        client.log_metrics(a, {"m": float(step)}, step=step)
    d = client.create_run(exp, run_name="D")
    client.log_metrics(d, {"m": 1.0}, step=0)
    try:
        client.flush()
    except Exception:
        pass
    spooled = {r.run_id or str(r.pending_id): r.spooled["metrics"] for r in client.status().runs}
    say(phase=2, spooled=spooled)
    step = 20
if cfg["die"] == "wait":
    time.sleep(120)
while step < 5000:  # killed meanwhile, mid-logging
    client.log_metrics(a, {"m": float(step)}, step=step)
    step += 1
    if step % 5 == 0:
        client.flush()
        say(stored=step)
        if step >= 30 and cfg["die"] == "os._exit":
            os._exit(3)
        if step >= 30 and cfg["die"] == "children":
            me = str(os.getpid())
            for entry in filter(str.isdigit, os.listdir("/proc")):
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if stat.rsplit(")", 1)[1].split()[1] == me:
                    os.kill(int(entry), 9)
            os._exit(3)
    time.sleep(0.002)
time.sleep(120)
"""


class SwitchProxy(Proxy):
    """A proxy that forwards everything, or (``down``) answers 503 to everything."""

    down = False

    def policy(self, path: str) -> Action:
        return 503 if self.down else FORWARD


class Child:
    """The client process, under a subreaper."""

    def __init__(self, work: Path, **cfg: Any) -> None:
        self.work = work
        self.spool = work / "spool"
        cfg = {"work": str(work), "spool": str(self.spool), "phase2": False, "die": "kill", **cfg}
        self.stderr = open(work / "stderr.txt", "w+")  # noqa: SIM115 - closed by `children`
        self.proc = subprocess.Popen(
            [sys.executable, SUBREAPER, "60", "--", sys.executable, "-c", CHILD, json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            stdin=subprocess.DEVNULL,
            env=script_env(RUNACTORS_KEEPER_WARMUP="0"),  # a keeper that has lived a while
            cwd=REPO,
            text=True,
        )
        self.said: dict[str, Any] = {}

    def read(self, key: str, timeout: float = 60.0) -> dict[str, Any]:
        """The child's next line that has ``key``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if not line.startswith("{"):  # MLflow's own output
                continue
            said = json.loads(line)
            if "reaped" in said:
                self.said["subreaper"] = said
                if key == "reaped":
                    return said
                break
            self.said.update(said)
            if key in said:
                return said
        raise AssertionError(f"the child never said {key!r}:\n{self.errors()}")

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the subreaper's report: every process of the tree gone, or what was left."""
        if "subreaper" not in self.said:
            self.read("reaped", timeout)
        self.proc.wait(10)
        return dict(self.said["subreaper"])


@pytest.fixture
def children() -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for child in made:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
        child.stderr.close()


def _runs(store: MlflowClient, experiment_id: str) -> dict[str, Any]:
    return {run.info.run_name: run for run in store.search_runs([experiment_id])}


def _wait_ended(store: MlflowClient, experiment_id: str, names: str, timeout: float) -> float:
    """Seconds until every run of ``names`` is KILLED (fails after ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        runs = _runs(store, experiment_id)
        if all(name in runs and runs[name].info.status == "KILLED" for name in names):
            return time.monotonic() - start
        time.sleep(0.1)
    states = {name: run.info.status for name, run in _runs(store, experiment_id).items()}
    raise AssertionError(f"runs not ended within {timeout} s: {states}")


def _steps(store: MlflowClient, run: Any) -> list[int]:
    return sorted(m.step for m in store.get_metric_history(run.info.run_id, "m"))


def _assert_nothing_left(report: dict[str, Any], keeper: int, child: Child) -> None:
    assert report["left"] == [], f"processes left behind: {report}\n{child.errors()}"
    assert str(keeper) in report["reaped"], report  # the keeper outlived its parent, then exited
    assert not list(spool_files(child.spool)), list(child.spool.iterdir())


@pytest.mark.parametrize(
    ("executor", "die"),
    [("thread", "kill"), ("process", "killpg"), ("thread", "os._exit"), ("thread", "children")],
)
def test_a_process_killed_mid_logging_has_its_runs_ended(
    tmp_path: Path,
    tracking_uri: str,
    experiment_id: str,
    store: MlflowClient,
    children: list[Child],
    executor: str,
    die: str,
) -> None:
    child = Child(
        tmp_path, uri=tracking_uri, experiment_id=experiment_id, executor=executor,
        retry_timeout=2.0, die=die,
    )  # fmt: skip
    children.append(child)
    said = child.read("stored")
    while said["stored"] < 30:
        said = child.read("stored")
    died = time.time()
    if die == "kill":
        os.kill(said["pid"], signal.SIGKILL)
    elif die == "killpg":  # its whole process group, as a terminal's Ctrl-C reaches it
        os.killpg(said["pid"], signal.SIGKILL)
    took = _wait_ended(store, experiment_id, "AC", ENDED_WITHIN)
    report = child.finish()
    print(f"{executor}/{die}: runs ended {took:.2f} s after the death; tree gone: {report}")
    runs = _runs(store, experiment_id)
    assert runs["B"].info.status == "FINISHED"  # terminated by the process: left as it was
    for name in "AC":
        assert died * 1000 - 2000 <= runs[name].info.end_time <= time.time() * 1000
    # Everything the process had flushed is stored, once (nothing queued is journaled yet
    # without the write-ahead journal; with it, more would be).
    steps = _steps(store, runs["A"])
    assert steps[: said["stored"]] == list(range(said["stored"])), steps
    assert len(steps) == len(set(steps))
    _assert_nothing_left(report, said["keeper"], child)


@pytest.fixture
def switch(mlflow_server: MlflowServer) -> Iterator[SwitchProxy]:
    proxy = SwitchProxy(mlflow_server.uri)
    try:
        yield proxy
    finally:
        proxy.close()


def _spooled_child(tmp_path: Path, switch: SwitchProxy, executor: str) -> tuple[Child, str]:
    """A child that logged through ``switch``, then spooled phase 2 with the store down."""
    experiment_id = MlflowClient(switch.uri).create_experiment(f"keeper-{tmp_path.name}")
    child = Child(
        tmp_path, uri=switch.uri, experiment_id=experiment_id, executor=executor,
        retry_timeout=0.5, phase2=True, die="wait",
    )  # fmt: skip
    child.read("phase")
    switch.down = True
    (tmp_path / "down").touch()
    said = child.read("spooled")
    assert said["spooled"]["pending-1-4"] == 1, said  # D: its creation and metric spooled
    assert list(spool_files(child.spool))
    return child, experiment_id


def _assert_all_stored(store: MlflowClient, experiment_id: str) -> dict[str, Any]:
    runs = _runs(store, experiment_id)
    assert sorted(runs) == ["A", "B", "C", "D"]
    assert _steps(store, runs["A"]) == list(range(20))  # stored once each: none twice
    assert _steps(store, runs["B"]) == list(range(10))
    assert _steps(store, runs["D"]) == [0]
    assert runs["B"].info.status == "FINISHED"
    return runs


def test_the_keeper_delivers_the_journal_of_a_killed_process(
    tmp_path: Path, switch: SwitchProxy, children: list[Child]
) -> None:
    child, experiment_id = _spooled_child(tmp_path, switch, "thread")
    children.append(child)
    switch.down = False
    died = time.time()
    os.kill(child.said["pid"], signal.SIGKILL)
    store = MlflowClient(switch.uri)
    took = _wait_ended(store, experiment_id, "ACD", ENDED_WITHIN)
    report = child.finish()
    print(f"journal delivered, runs ended {took:.2f} s after the death; tree gone: {report}")
    runs = _assert_all_stored(store, experiment_id)
    assert all(runs[name].info.end_time >= died * 1000 - 2000 for name in "ACD")
    _assert_nothing_left(report, child.said["keeper"], child)


def test_with_the_store_down_the_keeper_leaves_replay_to_end_the_runs(
    tmp_path: Path, switch: SwitchProxy, children: list[Child]
) -> None:
    child, experiment_id = _spooled_child(tmp_path, switch, "process")
    children.append(child)
    died = time.time()
    os.kill(child.said["pid"], signal.SIGKILL)
    report = child.finish()  # the keeper gave up after retry_timeout, and exited
    assert report["left"] == [] and str(child.said["keeper"]) in report["reaped"], report
    assert "runactors replay" in child.errors()
    assert [p.name for p in spool_files(child.spool)]  # left for replay
    switch.down = False
    store = MlflowClient(switch.uri)
    assert {run.info.status for run in _runs(store, experiment_id).values()} == {
        "RUNNING",
        "FINISHED",
    }
    replay = subprocess.run(
        [sys.executable, "-m", "client._cli", "replay", str(child.spool), "--retry-timeout", "5"],
        env=script_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "3 runs of a dead process ended KILLED" in replay.stdout, replay.stdout
    runs = _assert_all_stored(store, experiment_id)
    for name in "ACD":
        assert runs[name].info.status == "KILLED"
        # Ended when the keeper saw the death, not when replay ran.
        assert died * 1000 - 2000 <= runs[name].info.end_time <= died * 1000 + 30_000
    assert not list(spool_files(child.spool))


def test_a_clean_close_lets_the_keeper_go_and_leaves_runs_as_they_are(
    tmp_path: Path, tracking_uri: str, experiment_id: str, store: MlflowClient
) -> None:
    from actors.keeper import LINK

    client = QueueingClient(tracking_uri, spool_dir=tmp_path / "spool")
    run = client.create_run(experiment_id)
    client.log_metrics(run, {"m": 1.0})
    client.flush()
    keeper = LINK.pid
    assert keeper is not None and running(keeper) and client.status().keeper == "running"
    assert client.keeper_healthy()
    client.close()
    start = time.monotonic()
    while running(keeper) and time.monotonic() - start < 5:  # init reaps it, when it will
        time.sleep(0.02)
    assert not running(keeper), "the keeper outlived a clean close"
    assert time.monotonic() - start < 2.0
    assert client.status().keeper == "stopped"
    assert store.get_run(run.resolve()).info.status == "RUNNING"


def test_a_killed_keeper_is_restarted(
    tmp_path: Path, tracking_uri: str, experiment_id: str
) -> None:
    from actors.keeper import LINK

    client = QueueingClient(tracking_uri, spool_dir=tmp_path / "spool")
    try:
        client.create_run(experiment_id)
        client.flush()
        first = LINK.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        start = time.monotonic()
        while (LINK.pid in (None, first) or client.status().keeper != "restarted") and (
            time.monotonic() - start < 10
        ):
            time.sleep(0.02)
        assert client.status().keeper == "restarted"
        assert client.keeper_healthy()
        assert not running(first)
        second = LINK.pid
    finally:
        client.close()
    assert second is not None
    start = time.monotonic()
    while running(second) and time.monotonic() - start < 5:
        time.sleep(0.02)
    assert not running(second)


def test_no_keeper_with_runactors_keeper_0(
    tmp_path: Path, tracking_uri: str, experiment_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from actors.keeper import LINK

    monkeypatch.setenv("RUNACTORS_KEEPER", "0")
    client = QueueingClient(tracking_uri, spool_dir=tmp_path / "spool")
    try:
        client.create_run(experiment_id)
        assert client.status().keeper is None and LINK.pid is None
        assert client.keeper_healthy()
    finally:
        client.close()
