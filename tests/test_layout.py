"""The layout's rules, and the benchmark command still running end to end."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from click.testing import CliRunner

from client._cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_actors_never_imports_client():
    for path in (ROOT / "actors").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "client" or n.startswith("client.") for n in names), path


def test_bench_runs_both_clients_side_by_side():
    result = CliRunner().invoke(
        main,
        ["bench", "--calls", "200", "--repeat", "1", "--runs", "2", "--steps", "5", "--json"],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{") :])
    assert figures["hot_path"]["seed_us"] > 0 and figures["hot_path"]["runactors_us"] > 0
    contenders = [t["contender"] for t in figures["throughput"]]
    assert contenders == ["mlflow seed client", "runactors thread", "runactors process"]
    assert all(t["points"] == 20 for t in figures["throughput"])
