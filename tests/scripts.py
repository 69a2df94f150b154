"""Python code run as a separate process, with this checkout's ``actors`` and ``client``
importable: for what only a fresh interpreter shows (its exit, its at-exit handlers)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = str(Path(__file__).resolve().parent.parent)


def script_env(**env: str) -> dict[str, str]:
    """This process's environment, with this checkout's packages importable, plus ``env``."""
    return {**os.environ, "PYTHONPATH": REPO, **env}


def run_script(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) with ``python -c`` in the repository, this process's
    environment plus ``env``; return its exit code and captured output."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=script_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
