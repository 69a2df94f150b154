"""A real Prometheus scrapes a real service: docs/operations.md's queries, scrape config and
alerting rules, and docs/grafana-dashboard.json's panels, as a user would use them.

What is checked is read from the docs, never copied here, so the docs cannot drift: the
scrape config, the alerting rules, the table of queries and every panel's query.

``test_documented_prometheus_files_pass_promtool``: ``promtool check config`` on the scrape
config (which names the rules file) and ``promtool check rules`` on the rules.

``test_prometheus_scrapes_a_service``: a service process (three clients: one delivering to a
SQLite store, with a finished run, an idle one, a run with queued entities and a failed
call to a run that does not exist; one to a refused port with ``spool_dir``, its run
spooled; one to a refused port with a long ``retry_timeout``, its run retrying) serves its
status through ``RUNACTORS_STATUS_PORT``; a Prometheus on loopback (its own port and
storage folder, the documented scrape config and rules, a 0.5 s scrape and evaluation
interval) scrapes it once before the service logs anything, then after. Each documented
query must then answer what the service's ``status()`` says (its ``/status`` document):
runs by state, entities queued, spooled and logged by kind, the failing and retrying runs;
the flush quantile what the served histogram's buckets give; each alert is raised
(pending or firing); every dashboard query runs without error and returns data.

Skipped, with one line, where ``prometheus`` or ``promtool`` is not on PATH (Debian's
``prometheus`` package brings both; ``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import math
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from scripts import REPO, script_env

from actors import KINDS, STATES

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
if not (PROMETHEUS and PROMTOOL):
    pytest.skip(
        "prometheus/promtool not on PATH (Debian: apt-get install prometheus): "
        "the real-Prometheus tests are skipped",
        allow_module_level=True,
    )
pytestmark = pytest.mark.slow

DOCS = Path(REPO) / "docs"
OPERATIONS = DOCS / "operations.md"
DASHBOARD = DOCS / "grafana-dashboard.json"
INTERVAL = "500ms"  # scrape and rule evaluation (Prometheus takes no "0.5s")
WAIT = 60.0  # seconds: a generous bound for a loaded machine, never a timing assertion

# -- what the docs say ------------------------------------------------------------------------


def yaml_block(containing: str) -> str:
    """The one fenced ``yaml`` block of operations.md with ``containing`` in it."""
    blocks = re.findall(r"^```yaml\n(.*?)^```$", OPERATIONS.read_text(), re.S | re.M)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"operations.md: {len(found)} yaml blocks hold {containing!r}"
    return str(found[0])


def documented_queries() -> dict[str, str]:
    """operations.md's table of queries: question -> PromQL."""
    lines = OPERATIONS.read_text().splitlines()
    start = lines.index("| question | PromQL |")
    queries = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        question, promql = (cell.strip() for cell in line.strip("|").split("|", 1))
        assert promql.startswith("`") and promql.endswith("`"), line
        queries[question] = promql.strip("`")
    return queries


# Grafana's variables, as Grafana fills them in: "All" instances, and a rate window of four
# scrapes at least (here 1 m: far more than the test's 0.5 s scrapes).
GRAFANA_VARIABLES = {"$instance": ".+", "$__rate_interval": "1m"}


def dashboard_queries() -> list[tuple[str, str]]:
    """Every panel's query of the Grafana dashboard, Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know: {expr}"
            queries.append((f"{panel['title']} ({target['refId']})", expr))
    assert queries
    return queries


def write_prometheus_files(folder: Path, target: str | None = None) -> Path:
    """The documented prometheus.yml (its job scraping ``target`` every ``INTERVAL``, when
    given) and the rules file it names, in ``folder``; returns the config's path."""
    config = yaml.safe_load(yaml_block("scrape_configs:"))
    [rules_file] = config["rule_files"]
    (folder / rules_file).write_text(yaml_block("groups:"))
    if target is not None:
        config["global"] = {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL}
        [job] = config["scrape_configs"]
        job["scrape_interval"] = INTERVAL
        job["scrape_timeout"] = INTERVAL
        [static] = job["static_configs"]
        static["targets"] = [target]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config) if target is not None else yaml_block("scrape_configs:"))
    return path


def test_documented_prometheus_files_pass_promtool(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    config = write_prometheus_files(tmp_path)
    for args in (["check", "config", str(config)], ["check", "rules", "runactors-alerts.yml"]):
        done = subprocess.run(
            [PROMTOOL, *args], cwd=tmp_path, capture_output=True, text=True, timeout=WAIT
        )
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
        assert "SUCCESS" in done.stdout
    rules = yaml.safe_load(yaml_block("groups:"))["groups"][0]["rules"]
    assert [rule["alert"] for rule in rules] == [
        "RunactorsFlushFailing",
        "RunactorsSpoolGrowing",
        "RunactorsRunRetrying",
    ]


# -- a service and a Prometheus ---------------------------------------------------------------

SERVICE = """
import os, sys
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from client import QueueingClient

store, refused, spool_dir = sys.argv[1:4]
experiment_id = MlflowClient(store).create_experiment("prometheus")
delivering = QueueingClient(store)  # the first client starts the status server
spooling = QueueingClient(refused, spool_dir=spool_dir, retry_timeout=0.2)
retrying = QueueingClient(refused, retry_timeout=600)
print("ready", flush=True)
sys.stdin.readline()  # Prometheus has scraped the service before it did anything

finished = delivering.create_run(experiment_id, run_name="finished")
idle = delivering.create_run(experiment_id, run_name="idle")
for round in range(6):  # six flush rounds of each run: the flush histogram's observations
    for step in range(round * 50, (round + 1) * 50):
        delivering.log_metrics(finished, {"loss": 1 / (step + 1), "acc": step / 300}, step=step)
        delivering.log_metrics(idle, {"loss": 2 / (step + 1)}, step=step)
    delivering.log_params(finished, {f"p{round}": round})
    delivering.flush()
delivering.set_tags(idle, {"team": "a", "stage": "b"})
delivering.set_terminated(finished)
delivering.flush()
delivering.log_metrics("0" * 32, {"loss": 1.0}, step=0)  # no such run: a permanent failure
try:
    delivering.flush()
except MlflowException:
    pass
delivering.log_metrics(idle, {"loss": 0.0}, step=10_000)  # queued, never flushed
delivering.log_params(idle, {"late": 1})

spooled = spooling.create_run(experiment_id, run_name="spooled")
spooling.log_metrics(spooled, {"loss": 1.0, "acc": 0.5}, step=0)
try:
    spooling.flush()  # nothing listens: retried for 0.2 s, then spooled
except MlflowException:
    pass

stuck = retrying.create_run(experiment_id, run_name="retrying")
retrying.log_metrics(stuck, {"loss": 1.0}, step=0)
retrying.flush(synchronous=False)  # retried for 600 s: "retrying" for the whole test
print("done", flush=True)
sys.stdin.readline()
os._exit(0)  # nothing to keep: the test has read what it needed
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


class Prometheus:
    """A Prometheus server on loopback with its own storage, stopped by :meth:`stop`."""

    def __init__(self, folder: Path, config: Path) -> None:
        assert PROMETHEUS is not None
        # Prometheus cannot take port 0: a port free a moment ago, retried if taken meanwhile.
        self.folder = folder
        self.log = folder / "prometheus.log"
        for _ in range(5):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with self.log.open("w") as log:
                self.process = subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={folder / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--log.level=warn",
                    ],
                    cwd=folder,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._ready():
                return
            self.stop()
            if "address already in use" not in self.log.read_text():
                break
        raise AssertionError(f"Prometheus did not start:\n{self.log.read_text()}")

    def _ready(self) -> bool:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                get(self.url + "/-/ready")
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            answer = json.loads(get(url))
        except urllib.error.HTTPError as error:  # a bad query: Prometheus says why
            with error:
                answer = json.loads(error.read())
        assert answer["status"] == "success", f"{path} {params}: {answer}"
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector ``promql`` gives now."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", f"{promql}: {data}"
        return list(data["result"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def service(tmp_path: Path, template_db: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The service process and its status URL, once its status server serves."""
    shutil.copy(template_db, tmp_path / "mlflow.db")  # migrated once per test session
    port = free_port()
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = [f"sqlite:///{tmp_path / 'mlflow.db'}", refused, str(tmp_path / "spool")]
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SERVICE), *args],
        env=script_env(
            RUNACTORS_STATUS_PORT=str(port),
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
            MLFLOW_HTTP_REQUEST_TIMEOUT="2",
        ),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


def expect_line(process: subprocess.Popen[str], line: str) -> None:
    """The service's next line is ``line`` (within ``WAIT``: a hung service fails the test)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], WAIT)
    got = process.stdout.readline().strip() if ready else "nothing"
    assert got == line, f"the service said {got!r}, not {line!r} (exit code {process.poll()})"


def by_label(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {sample["metric"][label]: float(sample["value"][1]) for sample in result}


def scalar(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's ``histogram_quantile`` of cumulative ``(upper bound, count)`` buckets."""
    total = buckets[-1][1]
    rank = q * total
    for index, (bound, count) in enumerate(buckets):
        if count >= rank:
            if bound == math.inf:
                return buckets[-2][0]
            start, below = (0.0, 0.0) if index == 0 else buckets[index - 1]
            return start + (bound - start) * (rank - below) / (count - below)
    raise AssertionError(buckets)


def served_flush_buckets(status_url: str) -> list[tuple[float, float]]:
    text = get(status_url + "/metrics").decode()
    for family in text_string_to_metric_families(text):
        if family.name == "runactors_flush_seconds":
            return [
                (float(s.labels["le"]), s.value)
                for s in family.samples
                if s.name == "runactors_flush_seconds_bucket"
            ]
    raise AssertionError("no runactors_flush_seconds in /metrics")


def status_totals(status_url: str) -> dict[str, Any]:
    """What the service's clients' ``status()`` say, summed over their runs."""
    runs = [run for c in json.loads(get(status_url + "/status"))["clients"] for run in c["runs"]]
    totals: dict[str, Any] = {"states": dict.fromkeys(STATES, 0.0)}
    for run in runs:
        totals["states"][run["state"]] += 1
    for field in ("queued", "spooled", "logged"):
        totals[field] = {kind: float(sum(run[field][kind] for run in runs)) for kind in KINDS}
    totals["errors"] = sum(len(run["errors"]) for run in runs)
    totals["retries"] = sum(run["retries"] for run in runs)
    return totals


# Each documented question, and how its answer must match the service's status(): the keys
# must be exactly the doc table's questions.
Check = Callable[[list[dict[str, Any]], dict[str, Any], str], None]


def _states(result: list[dict[str, Any]], status: dict[str, Any], url: str) -> None:
    assert by_label(result, "state") == status["states"]


def _per_kind(field: str) -> Check:
    def check(result: list[dict[str, Any]], status: dict[str, Any], url: str) -> None:
        assert by_label(result, "kind") == status[field]

    return check


def _delivering(result: list[dict[str, Any]], status: dict[str, Any], url: str) -> None:
    assert status["logged"]["metrics"] > 0
    assert scalar(result) > 0


def _failing(result: list[dict[str, Any]], status: dict[str, Any], url: str) -> None:
    assert status["errors"] > 0
    assert scalar(result) > 0  # the alert's condition holds


def _retrying(result: list[dict[str, Any]], status: dict[str, Any], url: str) -> None:
    assert scalar(result) == status["states"]["retrying"] == 1


def _retries(result: list[dict[str, Any]], status: dict[str, Any], url: str) -> None:
    assert status["retries"] > 0
    assert scalar(result) > 0


def _flush_p95(result: list[dict[str, Any]], status: dict[str, Any], url: str) -> None:
    # The rate's window holds every flush (the first scrape saw none): the quantile of the
    # served buckets' counts, whatever factor rate() scales them all by.
    expected = histogram_quantile(0.95, served_flush_buckets(url))
    assert scalar(result) == pytest.approx(expected, rel=1e-6)


CHECKS: dict[str, Check] = {
    "runs in each state": _states,
    "entities queued, not yet acknowledged (is the service keeping up?)": _per_kind("queued"),
    "entities waiting on disk (spool)": _per_kind("spooled"),
    "entities delivered since the process started": _per_kind("logged"),
    "metric points delivered per second": _delivering,
    "is the store failing?": _failing,
    "is the store flaky or down? (alert if it lasts minutes)": _retrying,
    "transient failures retried per second": _retries,
    "95th percentile of a run's flush round, in seconds": _flush_p95,
}


def eventually(check: Callable[[], None]) -> None:
    """Run ``check`` until it passes: Prometheus sees the service's last state at its next
    scrape (0.5 s), and evaluates rules at its next evaluation."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_prometheus_scrapes_a_service(
    tmp_path: Path, service: tuple[subprocess.Popen[str], str]
) -> None:
    queries = documented_queries()
    assert set(queries) == set(CHECKS), "the doc's questions and the test's checks differ"
    process, status_url = service
    target = status_url.removeprefix("http://")
    prometheus = Prometheus(tmp_path, write_prometheus_files(tmp_path, target))
    try:
        expect_line(process, "ready")

        # A first scrape of the service before it logs anything: every counter starts at 0
        # in Prometheus' window, so rate() and increase() see all of what follows.
        def scraped() -> None:
            assert scalar(prometheus.query('up{job="runactors"}')) == 1

        eventually(scraped)
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
        expect_line(process, "done")

        for question, promql in queries.items():

            def answers(question: str = question, promql: str = promql) -> None:
                result = prometheus.query(promql)
                try:
                    CHECKS[question](result, status_totals(status_url), status_url)
                except AssertionError as error:
                    raise AssertionError(f"{question}: {promql} gave {result}") from error

            eventually(answers)

        # The documented rules are loaded, evaluate without error, and each alert is raised.
        def alerts_raised() -> None:
            [group] = prometheus.api("rules")["groups"]
            for rule in group["rules"]:
                assert rule["health"] == "ok", rule
            raised = {
                a["labels"]["alertname"]: a["state"] for a in prometheus.api("alerts")["alerts"]
            }
            assert set(raised) == {rule["name"] for rule in group["rules"]}, raised
            assert set(raised.values()) <= {"pending", "firing"}

        eventually(alerts_raised)

        # Every panel of the dashboard: a valid query, with data (the service has some of
        # everything: deliveries, failures, retries, a spool, flushes).
        for title, promql in dashboard_queries():
            result = prometheus.query(promql)
            assert result, f"dashboard panel {title}: {promql} gave no data"
            for sample in result:
                assert not math.isnan(float(sample["value"][1])), f"{title}: {promql}: {result}"
    finally:
        prometheus.stop()
        assert process.stdin is not None
        process.stdin.close()
