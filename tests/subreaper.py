"""Run a command as a child of a *subreaper*, and say which processes it left behind.

``python tests/subreaper.py TIMEOUT -- COMMAND...``: this process becomes a child subreaper
(``prctl(PR_SET_CHILD_SUBREAPER)``), so every process that COMMAND's tree orphans (a keeper
outliving its parent, a worker) is re-parented here rather than to init, and reaped here.
Once no child is left, or TIMEOUT seconds after the start, it prints one JSON line:
``{"reaped": {pid: seconds after the start}, "left": [pids still running]}`` (those are then
killed), and exits. COMMAND shares this process's stdin, stdout and stderr, and leads a
process group of its own (a test may signal that group).

A test-only helper: a test that made itself a subreaper would adopt the orphans of every
other test running in its process.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def _children() -> list[int]:
    me, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # the ppid, after the state
            found.append(int(entry))
    return found


def main() -> None:
    timeout = float(sys.argv[1])
    command = sys.argv[sys.argv.index("--") + 1 :]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    start = time.monotonic()
    subprocess.Popen(command, start_new_session=True)  # its own group; reaped below
    reaped: dict[int, float] = {}
    while time.monotonic() - start < timeout:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            reaped[pid] = round(time.monotonic() - start, 3)
        else:
            time.sleep(0.02)
    left = _children()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in left:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    print(json.dumps({"reaped": reaped, "left": left}), flush=True)


if __name__ == "__main__":
    main()
