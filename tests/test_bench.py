"""``runactors bench``: every scenario runs end to end with tiny sizes and reports sane
figures (never timed assertions: the figures are the bench's, not the tests')."""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from client._cli import main
from client.bench import _postgres
from client.bench._scenarios import SCENARIOS

TINY = [
    "--rounds", "1", "--calls", "200", "--repeat", "1", "--runs", "2", "--steps", "3",
    "--small-runs", "3", "--server-runs", "2", "--server-steps", "2", "--scale-runs", "20",
]  # fmt: skip


def run_bench(*args: str) -> dict:
    result = CliRunner().invoke(main, ["bench", *TINY, "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario",
    [
        name
        for name in SCENARIOS
        if name not in ("server-thread", "scale-10k", "postgres-thread", "small-runs-postgres")
    ],
)
def test_each_sqlite_scenario_reports_a_ratio_against_its_baseline(scenario):
    figures = run_bench("--scenario", scenario)
    (result,) = figures["scenarios"]
    assert result["name"] == scenario
    # hot-journal also shows the journal writer's commit per call
    assert len(result["measurements"]) == (3 if scenario == "hot-journal" else 2)
    for measurement in result["measurements"]:
        assert len(measurement["per_round"]) == 1 and measurement["best"] > 0
    (ratio,) = result["ratios"]
    assert ratio["of_best"] > 0 and ratio["goal"] > 0
    assert isinstance(ratio["meets_goal"], bool)
    if not scenario.startswith("hot"):  # throughput: every contender delivered the same points
        points = {m["points"] for m in result["measurements"]}
        assert points == ({3 * 10} if scenario.startswith("small-runs") else {2 * 3 * 2})


@pytest.mark.slow
def test_server_scenario_starts_and_stops_its_own_server():
    figures = run_bench("--scenario", "server-thread")
    (result,) = figures["scenarios"]
    contenders = [m["contender"] for m in result["measurements"]]
    assert contenders == ["mlflow client loop", "mlflow queueing client", "runactors thread"]
    assert [r["name"] for r in result["ratios"]] == [
        "runactors thread / mlflow client loop",
        "runactors thread / mlflow queueing client",
    ]
    assert all(r["of_best"] > 0 for r in result["ratios"])


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["postgres-thread", "small-runs-postgres"])
def test_postgres_scenario_starts_and_stops_its_own_server(scenario):
    reason = _postgres.missing()
    if reason is not None:
        pytest.skip(reason)
    figures = run_bench("--scenario", scenario)
    (result,) = figures["scenarios"]
    assert result["skipped"] is None
    assert [m["contender"] for m in result["measurements"]] == ["direct loop", "runactors thread"]
    points = 3 * 10 if scenario == "small-runs-postgres" else 2 * 3 * 2
    assert {m["points"] for m in result["measurements"]} == {points}
    (ratio,) = result["ratios"]
    assert ratio["name"] == "runactors thread / direct loop" and ratio["goal"] == 3.0
    assert ratio["of_best"] > 0
    assert not list(Path(tempfile.gettempdir()).glob("runactors-bench-pg-*"))  # removed


def test_postgres_scenario_skips_with_a_clear_line_without_the_binaries(monkeypatch, tmp_path):
    monkeypatch.setattr(_postgres, "PG_BIN", tmp_path)
    result = CliRunner().invoke(main, ["bench", *TINY, "--scenario", "postgres-thread"])
    assert result.exit_code == 0, result.output
    assert "postgres-thread: " in result.output
    assert f"skipped: PostgreSQL server binaries not found ({tmp_path / 'initdb'}" in result.output


@pytest.mark.slow
def test_scale_scenario_reports_absolute_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # From a folder holding a ``client/`` package of its own: the measurement's subprocess
    # must import runactors' ``client`` all the same, as the worker template imports its
    # ``actors`` (tests/test_template_path.py).
    project = tmp_path / "project"
    (project / "client").mkdir(parents=True)
    (project / "client" / "__init__.py").write_text(
        "raise ImportError('the project client package was imported')\n"
    )
    monkeypatch.chdir(project)
    figures = run_bench("--scenario", "scale-10k")
    (result,) = figures["scenarios"]
    assert result["ratios"] == []
    assert set(result["figures"]) == {
        "flush_return_ms",
        "flush_seconds",
        "peak_threads",
        "peak_rss_mb",
    }
    assert result["figures"]["peak_threads"] >= 1
    assert result["figures"]["peak_rss_mb"] > 10  # MLflow alone is more than this


@pytest.mark.slow
def test_text_report_and_plot(tmp_path: Path):
    png = tmp_path / "ratios.png"
    result = CliRunner().invoke(
        main, ["bench", *TINY, "--scenario", "hot", "--scenario", "sqlite-thread", "--plot", png]
    )
    assert result.exit_code == 0, result.output
    assert "hot: log_metrics" in result.output
    assert "runactors thread / direct loop" in result.output
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_unknown_scenario_is_refused():
    result = CliRunner().invoke(main, ["bench", "--scenario", "nope"])
    assert result.exit_code != 0
    assert "nope" in result.output


class _Timer:
    """``time`` for the contenders' module: notes what the collector had pending (objects
    allocated since the last collection, per generation) each time a timer is read."""

    def __init__(self) -> None:
        self.counts: list[tuple[int, int, int]] = []

    def perf_counter(self) -> float:
        self.counts.append(gc.get_count())
        return time.perf_counter()

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.mark.parametrize("who", ["direct loop", "runactors"])
def test_a_measurement_starts_with_nothing_left_to_collect(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch, who: str
) -> None:
    # The untimed setup (a fresh store: MLflow caches ~46,000 objects per store) must not
    # leave the timed part a full collection to make: one of 0.1 s in a round of 0.2 s
    # halved runactors' ratio in one round of eight (sqlite-journal, docs/benchmarks.md).
    from client._client import QueueingClient
    from client.bench import _contenders

    timer = _Timer()
    monkeypatch.setattr(_contenders, "time", timer)
    contender = (
        _contenders.DirectLoop()
        if who == "direct loop"
        else _contenders.Queueing("runactors", lambda uri: QueueingClient(uri))
    )
    assert contender.measure(tracking_uri, _contenders.Workload(2, 3, 2)) > 0
    start = timer.counts[0]  # the timer's start
    assert start[1:] == (0, 0) and start[0] < 5, timer.counts
