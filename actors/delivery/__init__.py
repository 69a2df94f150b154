"""Delivery: performing a job's calls on a tracking store. Retries with backoff, runs created
once (the create key), the stores (a bounded REST store, a new SQLite store), the per-database
gate, and the SQL fast path for metric-only batches (:mod:`actors.delivery._sql_metrics`,
imported on first use only, so it is not imported here).
"""

from actors.delivery._create_key import CREATE_KEY_TAG
from actors.delivery._jobs import KINDS, Job, JobResult, JobState, empty_counts, failure_message
from actors.delivery._new_sqlite import create_sqlite_store
from actors.delivery._perform import perform_job
from actors.delivery._retry import call_with_retry, is_transient
from actors.delivery._store import make_client

__all__ = [
    "CREATE_KEY_TAG",
    "KINDS",
    "Job",
    "JobResult",
    "JobState",
    "call_with_retry",
    "create_sqlite_store",
    "empty_counts",
    "failure_message",
    "is_transient",
    "make_client",
    "perform_job",
]
