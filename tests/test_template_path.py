"""The worker template imports runactors' own ``actors`` package, never one that the current
folder happens to hold: actor projects often have an ``actors/`` folder of their own.

Tested with a non-editable install (``pip install --target``, as a wheel lands in
site-packages), where the current folder comes first on ``sys.path`` of ``python -m``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a non-editable install of this checkout (no dependencies)."""
    source = tmp_path_factory.mktemp("source")  # built from a copy: nothing is written here
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("actors", "client"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, source],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return target


@pytest.mark.slow
def test_an_actors_folder_in_the_current_folder_does_not_shadow_the_worker_template(
    installed: Path, tmp_path: Path, tracking_uri: str, store: object, experiment_id: str
) -> None:
    project = tmp_path / "project"
    (project / "actors").mkdir(parents=True)
    (project / "actors" / "__init__.py").write_text(
        "raise ImportError('the project actors package was imported')\n"
    )
    script = textwrap.dedent(
        f"""
        import client
        assert client.__file__.startswith({str(installed)!r}), client.__file__
        from client import QueueingClient

        c = QueueingClient({tracking_uri!r}, executor="process", max_workers=1)
        run = c.create_run({experiment_id!r}, run_name="shadowed")
        c.log_metrics(run, {{"m": 1.0}})
        c.set_terminated(run)
        c.flush()
        c.close()
        """
    )
    # The script itself runs from a file elsewhere: only the template starts in ``project``.
    path = tmp_path / "main.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(installed), "RUNACTORS_EXIT_TIMEOUT": "10"}
    done = subprocess.run(
        [sys.executable, str(path)],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = store.search_runs([experiment_id])  # type: ignore[attr-defined]
    assert run.info.run_name == "shadowed" and run.data.metrics == {"m": 1.0}
