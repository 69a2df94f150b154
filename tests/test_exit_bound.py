"""The exit bound, measured: a process whose flush hangs on a server that never answers
exits within ``RUNACTORS_EXIT_TIMEOUT`` seconds of its last line, on both executors."""

from __future__ import annotations

import re
import time

import pytest
from liveness import alive
from scripts import run_script

pytestmark = pytest.mark.slow  # each test runs a program to its exit


EXIT_TIMEOUT = 2.0
# Interpreter shutdown and a loaded machine: generous, still far below the default of 30 s
# and below the HTTP timeout, so only the exit bound can end the process in time.
MARGIN = 8.0

SCRIPT = """
import re, time
from client import QueueingClient

client = QueueingClient({uri!r}, executor={executor!r}, retry_timeout=600)
client.log_params("0" * 32, {{"p": "1"}})
client.flush(synchronous=False)
deadline = time.monotonic() + 60
while client.status().runs[0].state != "flushing":  # the call is on its way to the server
    assert time.monotonic() < deadline, client.status()
    time.sleep(0.01)
client.log_params("0" * 32, {{"q": "2"}})  # queued behind the hung call
print("worker", client.status().runs[0].worker, flush=True)
print("last line", time.time(), flush=True)
"""


def test_exit_is_bounded_with_a_hung_server(hung_server, executor):
    result = run_script(
        SCRIPT.format(uri=hung_server, executor=executor),
        timeout=180,
        RUNACTORS_EXIT_TIMEOUT=str(EXIT_TIMEOUT),
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="600",  # the hung request never times out by itself
    )
    exited = time.time()
    assert result.returncode == 0, result.stderr
    last_line = float(re.search(r"^last line (\S+)$", result.stdout, re.M).group(1))
    elapsed = exited - last_line
    print(f"{executor}: exited {elapsed:.2f} s after its last line")
    # It waited for the flush (up to the bound), then exited anyway.
    assert EXIT_TIMEOUT * 0.75 <= elapsed < EXIT_TIMEOUT + MARGIN, (elapsed, result.stderr)
    worker = re.search(r"^worker (.*)$", result.stdout, re.M).group(1)
    pid = re.search(r"\[pid (\d+)\]", worker)
    assert (pid is not None) == (executor == "process"), worker
    if pid is not None:  # the worker process went with its parent
        deadline = time.monotonic() + MARGIN
        while alive(int(pid.group(1))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(int(pid.group(1)))
