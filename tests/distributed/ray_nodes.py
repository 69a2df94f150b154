"""A real two-node Ray cluster on this machine, for the tests: ``ray start --head`` (node ``a``)
and ``ray start --address ...`` (node ``b``), each with its own ports, temp dir and custom
resource (``node_a`` / ``node_b``), every Ray process on a loopback address.

Ray rewrites ``--node-ip-address 127.0.0.1`` (and ``localhost``) into the machine's routable
address (``ray._private.services.resolve_ip_for_localhost``), so the nodes use ``127.0.0.2``:
also a loopback address on Linux (``127.0.0.0/8`` is routed to ``lo``), which Ray keeps as given.
No test traffic leaves loopback.

Ray 2.5x+ turns on token authentication for a head when a token is found in ``~/.ray``, and a
node joining without it is refused: every process here gets ``RAY_AUTH_MODE=token`` and a
throwaway ``RAY_AUTH_TOKEN`` of its own, so nothing depends on (or writes to) ``~/.ray``.

``ray stop`` would stop every Ray process of the machine (other tests' too), so the cluster
finds its own processes instead: each one inherits the marker variable ``RUNACTORS_TEST_RAY``
(the cluster's folder) or writes its logs under that folder. Linux only (``/proc``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import free_port

NODE_IP = "127.0.0.2"
MARKER = "RUNACTORS_TEST_RAY"
START_TIMEOUT = 120.0

# The head's GCS declares a node dead after 4 missed health checks 0.5 s apart (Ray's defaults:
# 3 s apart, 5 missed, about 15 s): a killed raylet is noticed in about 2 s, not 15.
FAST_NODE_DEATH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
}


def ray_executable() -> str:
    """The ``ray`` command of the running interpreter's environment."""
    here = Path(sys.executable).with_name("ray")
    found = str(here) if here.exists() else shutil.which("ray")
    if found is None:
        raise RuntimeError("no `ray` command next to the interpreter or on PATH")
    return found


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an orphan's parent may be slow to
    reap it, or never do: pid 1 of a container)."""
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(b")", 1)[-1].split()[0] != b"Z"


class TwoNodeRay:
    """Start with :meth:`start`, stop with :meth:`stop` (which reports what it had to kill)."""

    def __init__(self, extra_env: dict[str, str] | None = None, num_cpus: int = 2) -> None:
        # Short paths: Ray's unix sockets live under the temp dir (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="rt-ray-", dir="/tmp"))
        self.num_cpus = num_cpus
        self.temp_dirs: dict[str, Path] = {}
        self.gcs_address = ""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            {
                MARKER: str(self.root),
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": secrets.token_hex(16),
                **FAST_NODE_DEATH,
                **(extra_env or {}),
            }
        )
        self.env = env  # also the environment of a driver process of this cluster

    def _command(self, node: str) -> list[str]:
        head = node == "a"
        command = [ray_executable(), "start"]
        command += ["--head", "--port", self.gcs_address.rsplit(":", 1)[1]] if head else []
        command += [] if head else ["--address", self.gcs_address]
        command += [
            "--node-ip-address",
            NODE_IP,
            "--num-cpus",
            str(self.num_cpus),
            "--resources",
            f'{{"node_{node}": 1000}}',
            "--temp-dir",
            str(self.temp_dirs[node]),
            "--object-store-memory",
            str(80 * 1024 * 1024),  # Ray's minimum is 75 MiB; the trials store nothing
            "--include-log-monitor=false",
            "--disable-usage-stats",
        ]
        ports = [
            "--node-manager-port",
            "--object-manager-port",
            "--dashboard-agent-listen-port",  # Ray's default is a fixed 52365
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
        ]
        if head:
            # The head still starts a (headless) dashboard process, on a fixed 8265 by default.
            command += ["--include-dashboard=false"]
            ports.append("--dashboard-port")
        for option in ports:
            command += [option, str(free_port())]
        return command

    def start(self, attempts: int = 2) -> None:
        """Start both nodes at once (node ``b`` waits for the head's GCS) and wait for both
        ``ray start`` commands to return.

        Ray gives a new node's raylet a fixed 30 s to register with the GCS; on a machine
        loaded by parallel tests it may miss that, so a failed start is retried once, on
        new ports and temp dirs, after its processes are killed."""
        for attempt in range(1, attempts + 1):
            try:
                self._start(attempt)
                return
            except RuntimeError as error:
                print(f"Ray cluster start {attempt}/{attempts} failed: {error}")
                left = self.stop_processes()
                if attempt == attempts or left:
                    raise

    def _start(self, attempt: int) -> None:
        self.temp_dirs = {node: self.root / f"{node}{attempt}" for node in ("a", "b")}
        self.gcs_address = f"{NODE_IP}:{free_port()}"
        started: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        for node in ("a", "b"):
            self.temp_dirs[node].mkdir()
            log = self.root / f"start-{node}{attempt}.log"
            with open(log, "wb") as out:
                started[node] = (
                    subprocess.Popen(
                        self._command(node),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=self.env,
                        cwd=self.root,
                    ),
                    log,
                )
        deadline = time.monotonic() + START_TIMEOUT
        failed = []
        for node, (process, log) in started.items():
            try:
                code = process.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                code = None
            if code != 0:
                raylet = self.temp_dirs[node] / "session_latest" / "logs" / "raylet.out"
                failed.append(
                    f"`ray start` of node {node} ended with {code}:\n{_tail(log)}\n"
                    f"{raylet}:\n{_tail(raylet)}"
                )
        if failed:
            raise RuntimeError("\n".join(failed))

    def processes(self) -> list[int]:
        """The live processes of this cluster (and of its drivers), zombies excepted."""
        root = str(self.root).encode()
        marker = f"{MARKER}={self.root}\0".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            proc = f"/proc/{entry}"
            if not running(int(entry)):
                continue
            mine = marker in _read(f"{proc}/environ") or root in _read(f"{proc}/cmdline")
            if not mine:
                try:
                    mine = any(
                        os.readlink(f"{proc}/fd/{fd}").startswith(str(self.root))
                        for fd in os.listdir(f"{proc}/fd")
                    )
                except OSError:
                    mine = False
            if mine:
                found.append(int(entry))
        return found

    def describe(self, pids: list[int]) -> list[str]:
        """``pid command`` lines for a report."""
        lines = []
        for pid in pids:
            command = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
            lines.append(f"{pid} {command[:160]}")
        return lines

    def raylet_pid(self, node: str) -> int:
        """The pid of node ``node``'s raylet (its command line names the node's temp dir)."""
        temp_dir = str(self.temp_dirs[node]).encode()
        pids = [
            pid
            for pid in self.processes()
            if _read(f"/proc/{pid}/comm").strip() == b"raylet"
            and temp_dir + b"/" in _read(f"/proc/{pid}/cmdline")
        ]
        if len(pids) != 1:
            raise RuntimeError(f"expected one raylet of node {node}, found {pids}")
        return pids[0]

    def memory_mb(self) -> tuple[int, float, float]:
        """(processes, summed RSS, summed PSS) of the cluster now, in MiB. PSS splits shared
        pages among the processes that share them: the cluster's real share of memory."""
        count, rss, pss = 0, 0, 0
        for pid in self.processes():
            for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
                if line.startswith(b"Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith(b"Pss:"):
                    pss += int(line.split()[1])
            count += 1
        return count, rss / 1024, pss / 1024

    def stop_processes(self, grace: float = 1.0) -> list[str]:
        """SIGTERM every process of the cluster, SIGKILL what is left after ``grace`` s (the
        GCS and raylets take longer to end on SIGTERM, and nothing of them is kept).
        Returns the processes that outlived SIGKILL by 10 s."""
        for signum, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            pids = self.processes()
            for pid in pids:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            while pids and time.monotonic() < deadline:
                time.sleep(0.05)
                pids = self.processes()
            if not pids:
                break
        return self.describe(self.processes())

    def stop(self) -> list[str]:
        """:meth:`stop_processes`, then remove the cluster's folder."""
        left = self.stop_processes()
        shutil.rmtree(self.root, ignore_errors=True)
        return left
