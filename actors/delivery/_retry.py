"""Which failures are transient, and retrying one call with exponential backoff and jitter."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

from mlflow.exceptions import RestException

T = TypeVar("T")

# Text that marks a failure as transient wherever it appears in the exception chain.
_TRANSIENT_TEXT = (
    "database is locked",
    "database table is locked",
    "connection refused",
    "connection reset",
    "connection aborted",
    "temporarily unavailable",
    "too many requests",
    # Two runs logging the same new dataset at once race in MLflow's SQL store; the loser
    # finds the dataset there on retry.
    "unique constraint failed: datasets",
)
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
# How MLflow's REST client words an HTTP failure it gave up on.
_TRANSIENT_HTTP_TEXT = re.compile(
    r"error code (408|429|5\d\d)|too many (408|429|5\d\d) error responses|max retries exceeded"
)

BACKOFF_START = 0.05
BACKOFF_MAX = 2.0


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call later may succeed.

    Connection refused or reset, timeouts, HTTP 408/429/5xx answered by a server, MLflow's
    HTTP retries giving up, SQLite's "database is locked" and the datasets race are
    transient; everything else (bad input, missing runs, a local error) is permanent.

    Transient does not mean the call had no effect: a request whose answer was lost (reset,
    timeout, 5xx) may have landed. Resending is harmless for ``log_batch`` (MLflow's SQL
    store ignores metrics that landed twice, params and tags are idempotent), but not for
    ``create_run``: resending a creation that landed makes a second run.
    """
    for item in _chain(exc):
        if isinstance(item, ConnectionError | TimeoutError):
            return True
        # Only a server's answer carries a real HTTP status: a local MlflowException maps
        # every unknown error to 500, which says nothing about retrying.
        if isinstance(item, RestException) and item.get_http_status_code() in _TRANSIENT_HTTP:
            return True
        text = str(item).lower()
        if any(marker in text for marker in _TRANSIENT_TEXT) or _TRANSIENT_HTTP_TEXT.search(text):
            return True
    return False


def call_with_retry(
    fn: Callable[[], T],
    retry_timeout: float,
    on_retry: Callable[[BaseException, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, fails permanently, or ``retry_timeout`` seconds pass.

    Backoff doubles from 50 ms up to 2 s, with full jitter; the last error is raised.
    """
    deadline = time.monotonic() + retry_timeout
    backoff = BACKOFF_START
    while True:
        try:
            return fn()
        except Exception as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not is_transient(exc):
                raise
            delay = min(random.uniform(0, backoff), remaining)
            if on_retry is not None:
                on_retry(exc, delay)
            sleep(delay)
            backoff = min(backoff * 2, BACKOFF_MAX)
