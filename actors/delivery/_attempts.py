"""A call's attempts: retried within the job's ``retry_timeout`` with the run's hooks told when
retrying starts and ends, and a run's creation, which retries without ever making a second run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from actors.delivery._create_key import creation_with_key, find_created_run, uses_create_key_tag
from actors.delivery._jobs import JobStopped, RetryEndHook, RetryHook
from actors.delivery._retry import call_with_retry
from actors.delivery._sqlite_gate import database_gate, uri_database_key
from actors.delivery._store import request_deadline
from actors.queueing._queues import CreateRunCall

T = TypeVar("T")


def create_run(client: Any, call: CreateRunCall, gate: str | None) -> str:
    with database_gate(gate):
        run = client.create_run(
            experiment_id=call.experiment_id,
            start_time=call.start_time,
            tags=dict(call.tags),
            run_name=call.run_name,
        )
    return str(run.info.run_id)


class Retries:
    """Runs one call with :func:`call_with_retry` and tells the hooks when retrying starts
    and when it is over."""

    def __init__(
        self, timeout: float, on_retry: RetryHook | None, on_retry_end: RetryEndHook | None
    ) -> None:
        self.timeout = timeout
        self.on_retry = on_retry
        self.on_retry_end = on_retry_end
        self._retried = False

    def _note(self, exc: BaseException, delay: float) -> None:
        self._retried = True
        if self.on_retry is not None:
            self.on_retry(exc, delay)

    def __call__(self, fn: Callable[[], T]) -> T:
        self._retried = False
        try:
            # Each HTTP request of the call waits at most what is left of its retry_timeout.
            with request_deadline(time.monotonic() + self.timeout):
                return call_with_retry(fn, self.timeout, self._note)
        finally:
            if self._retried and self.on_retry_end is not None:
                self.on_retry_end()


class CreationFailed(Exception):
    """A ``create_run`` that failed past its retries, named: which run in which experiment,
    the creation's own last error, and the look-up's if an attempt ended in one. Its cause
    is the last error raised, so that it is as transient as that one."""


def creation_failed(
    call: CreateRunCall, created: BaseException | None, looked_up: BaseException | None
) -> CreationFailed:
    name = "a run" if call.run_name is None else f"run {call.run_name!r}"
    text = f"creating {name} in experiment {call.experiment_id} failed: {created!r}"
    if looked_up is not None:
        text += f"; looking up whether an earlier attempt made the run also failed: {looked_up!r}"
    return CreationFailed(text)


def creation_error(exc: BaseException, held: bool = False) -> str:
    """How a creation that did not go through reads wherever it was sent (a round, the
    spooler's re-send, a replay): ``create_run failed: creating run 'NAME' in experiment ID
    failed: <the store's error>``; ``held``: it failed transiently and stays in the spool, to
    be sent again (``create_run not delivered yet: ...``), not a creation that failed."""
    said = str(exc) if isinstance(exc, CreationFailed) else repr(exc)
    return f"create_run {'not delivered yet' if held else 'failed'}: {said}"


def create_once(client: Any, tracking_uri: str, call: CreateRunCall, retries: Retries) -> str:
    """Create the run, retrying transient failures without ever making a second run.

    On a tracking server the creation carries its create key (:mod:`actors.delivery._create_key`),
    and an attempt after one whose outcome is unknown (any transient failure: the request
    may have landed and only its answer been lost) first looks the run up by that key. In a
    local database a failed creation is a rolled-back transaction: it is simply sent again.
    A failure is raised as :class:`CreationFailed`, naming the creation (not only the look-up
    that the last attempt may have ended in).
    """
    key = call.create_key or str(uuid.uuid4())
    to_send = creation_with_key(tracking_uri, call, key)
    look_up = uses_create_key_tag(tracking_uri)
    attempted = False
    created: BaseException | None = None  # the creation's last error
    looked_up: BaseException | None = None  # the look-up's, if the last attempt ended in it

    def attempt() -> str:
        nonlocal attempted, created, looked_up
        looked_up = None
        if attempted and look_up:
            try:
                found = find_created_run(client, tracking_uri, to_send, key)
            except Exception as exc:
                looked_up = exc
                raise
            if found is not None:
                return found
        attempted = True
        try:
            return create_run(client, to_send, uri_database_key(tracking_uri))
        except Exception as exc:
            created = exc
            raise

    try:
        return retries(attempt)
    except JobStopped:
        raise
    except Exception as exc:
        raise creation_failed(call, created or exc, looked_up) from exc
