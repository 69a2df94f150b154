"""What a pool thread of the process executor sends a worker (a job, cloudpickled, without
the calls that cannot be pickled) and what it reports for the calls it could not send."""

from __future__ import annotations

import dataclasses

import cloudpickle

from actors.delivery._jobs import Job, JobResult, compress_errors, merge_results, record_outcome
from actors.queueing._plan import Call, call_kind


def dumps_job(job: Job, run_id: str | None, calls: list[Call], refused: JobResult) -> bytes | None:
    """The pickled job of ``calls``; a call that cannot be pickled is failed in ``refused``
    and removed from ``calls`` (the others go on, as after any failed call); ``None`` if no
    call is left to send."""

    def dumps() -> bytes:
        return bytes(cloudpickle.dumps(dataclasses.replace(job, run_id=run_id, calls=calls)))

    try:
        return dumps()
    except Exception:
        pass
    sendable: list[Call] = []
    for call in calls:
        try:
            cloudpickle.dumps(call)
        except Exception as exc:
            why = f"it cannot be pickled for a worker process: {exc!r}"
            record_outcome(refused, call, f"{call_kind(call)} not sent: {why}", None)
        else:
            sendable.append(call)
    calls[:] = sendable
    return dumps() if calls else None


def fail_rest(
    prior: JobResult | None, progress: JobResult | None, calls: list[Call], why: str
) -> JobResult:
    """The job's outcome when ``calls`` are left unsent because of ``why``."""
    if prior is None or progress is None:
        done = prior if progress is None else progress
    else:
        done = merge_results(prior, progress)
    assert done is not None
    for call in calls:
        record_outcome(done, call, f"{call_kind(call)} not sent: {why}", None)
    done.errors = compress_errors(done.errors)
    return done


def stop_rest(
    job: Job, prior: JobResult | None, progress: JobResult | None, calls: list[Call]
) -> JobResult:
    """The outcome when the client closed with ``calls`` unsent: spooled with a spool
    (the first may have been in flight in a worker that was stopped), failed without."""
    if not job.stop_on_transient:
        return fail_rest(prior, progress, calls, "the client was closed")
    done = fail_rest(prior, progress, [], "")
    done.unsent, done.unsent_error = list(calls), "not sent: the client was closed"
    done.unsent_attempted = True
    return done
