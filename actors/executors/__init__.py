"""Executors: where a run's jobs are performed. The thread pool, and the process pool whose
workers are forks of a pre-imported worker template (:mod:`actors.executors._process_executor`,
imported on first use of ``executor="process"``, so it is not imported here).
"""

from actors.executors._executor import Executor, JobPool, ThreadExecutor, default_max_workers
from actors.executors._python import python_main
from actors.executors._threads import DaemonThreads, ThreadsStopped

__all__ = [
    "DaemonThreads",
    "Executor",
    "JobPool",
    "ThreadExecutor",
    "ThreadsStopped",
    "default_max_workers",
    "python_main",
]
