"""Input that would fail a whole batch at the flush raises at the call instead, naming the key.

One bad call must cost that call only: a param logged again with another value, a number no
store can hold, a string that cannot be encoded as UTF-8. Each test makes the bad calls among
good ones, then checks, read back with MLflow's own client on both executors, that every good
point and param of the run was stored and that the run ended as requested.
"""

from __future__ import annotations

import threading
from fractions import Fraction

import mlflow
import numpy as np
import pytest
from mlflow.entities import Dataset, DatasetInput, InputTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from stores import run_data

from client import QueueingClient

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.fixture
def client(tracking_uri, executor):
    client = QueueingClient(tracking_uri, executor=executor)
    yield client
    client.close()


def raises_naming(name: str, call, *args, **kwargs) -> None:
    """``call`` raises MlflowException(INVALID_PARAMETER_VALUE) whose message names ``name``."""
    with pytest.raises(MlflowException) as exc:
        call(*args, **kwargs)
    assert exc.value.error_code == "INVALID_PARAMETER_VALUE", exc.value.message
    assert name in exc.value.message, exc.value.message


def history(store, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in store.get_metric_history(run_id, key))


def runs_of(store, experiment_id: str) -> list:
    return store.search_runs([experiment_id], run_view_type=ViewType.ALL)


# -- 1. a param logged again ------------------------------------------------------------


def test_a_param_logged_again_is_sent_once_and_a_changed_value_raises(client, store, experiment_id):
    long_value = "v" * (MAX_PARAM_VAL_LENGTH + 5)
    runs = [client.create_run(experiment_id), store.create_run(experiment_id).info.run_id]
    for run in runs:
        for step in range(100):
            client.log_metrics(run, {"loss": step / 100}, step=step)
        client.log_params(run, {"lr": 0.1, "layers": 3, "long": long_value})
        client.log_params(run, {"lr": 0.1})  # the same value again: harmless
        # The same as MLflow stores it (str(), then truncated): harmless too.
        client.log_params(run, {"lr": "0.1", "layers": 3, "long": long_value + "other tail"})
        raises_naming("'lr'", client.log_params, run, {"batch": 32, "lr": 0.2})
    assert [r.queued["params"] for r in client.status().runs] == [3, 3]
    client.flush()
    for run in runs:
        # Logged (flushed) counts as much as queued.
        client.log_params(run, {"lr": 0.1, "late": "x"})
        raises_naming("'layers'", client.log_params, run, {"layers": 4})
        client.set_terminated(run, "KILLED")
    client.flush()
    for run in runs:
        run_id = run if isinstance(run, str) else run.resolve()
        params = run_data(store, run_id)[0]
        assert params == {
            "lr": "0.1",
            "layers": "3",
            "long": long_value[: MAX_PARAM_VAL_LENGTH - 3] + "...",
            "late": "x",
        }
        assert history(store, run_id, "loss") == [(step, step / 100) for step in range(100)]
        assert store.get_run(run_id).info.status == "KILLED"
    assert [r.logged["params"] for r in client.status().runs] == [4, 4]  # none sent twice


def test_a_run_keeps_one_param_memory_under_both_its_names(client, store, experiment_id):
    """A PendingRunId and its run's ID string name one run: a param logged through one and
    changed through the other raises at the call, as MLflow refuses it; the same value
    through both is harmless, and sent once."""
    pending = client.create_run(experiment_id)
    client.log_params(pending, {"p": "1"})
    client.flush()
    run_id = pending.resolve()
    client.log_params(run_id, {"p": "1"})  # the same value through its other name
    raises_naming("'p'", client.log_params, run_id, {"p": "2"})
    client.log_params(run_id, {"q": "a"})  # the other way round: first through the ID
    raises_naming("'q'", client.log_params, pending, {"q": "b"})
    client.log_params(pending, {"q": "a", "r": "x"})
    raises_naming("'r'", client.log_params, run_id, {"r": "y"})  # queued, not yet flushed
    client.flush()
    assert run_data(store, run_id)[0] == {"p": "1", "q": "a", "r": "x"}
    assert sum(r.logged["params"] for r in client.status().runs) == 3  # none sent twice


def test_a_param_logged_again_takes_no_room_under_max_queued(store, tracking_uri, experiment_id):
    run_id = store.create_run(experiment_id).info.run_id
    client = QueueingClient(tracking_uri, max_queued=2)
    try:
        client.log_params(run_id, {"a": 1, "b": 2})  # the client is now full
        # Counted, the repeat would wait for room: a flush would deliver a and b now.
        client.log_params(run_id, {"a": 1})
        (run,) = client.status().runs
        assert (run.queued["params"], run.logged["params"]) == (2, 0)
        client.set_terminated(run_id)
        client.flush()
    finally:
        client.close()
    assert run_data(store, run_id)[0] == {"a": "1", "b": "2"}
    assert store.get_run(run_id).info.status == "FINISHED"


def test_threads_logging_overlapping_params_send_each_once(store, tracking_uri, experiment_id):
    # max_queued=10 makes calls wait for room (the lock released) while others log the same
    # keys: each must be counted and sent once, whichever thread gets there first.
    run_id = store.create_run(experiment_id).info.run_id
    client = QueueingClient(tracking_uri, max_queued=10)
    errors: list[BaseException] = []

    def log(first: int) -> None:
        try:
            for _ in range(5):
                client.log_params(run_id, {f"p{i}": i for i in range(first, first + 10)})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=log, args=(first,)) for first in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        client.flush()
    finally:
        client.close()
    assert errors == []
    assert run_data(store, run_id)[0] == {f"p{i}": str(i) for i in range(17)}
    assert client.status().runs[0].logged["params"] == 17


def test_a_param_dropped_by_an_exception_can_be_logged_again(tracking_uri, store, experiment_id):
    run_id = store.create_run(experiment_id).info.run_id
    client = QueueingClient(tracking_uri)
    try:
        with pytest.raises(ZeroDivisionError), client:
            client.log_params(run_id, {"lr": 0.1})
            1 / 0  # noqa: B018 - the context drops what was queued
        client.log_params(run_id, {"lr": 0.2})  # the dropped value was never logged
        client.flush()
    finally:
        client.close()
    assert run_data(store, run_id)[0] == {"lr": "0.2"}


# -- 2. numbers no store can hold -------------------------------------------------------


def test_numbers_no_store_can_hold_raise_naming_the_key(client, store, experiment_id):
    run = client.create_run(experiment_id)
    for step in range(20):
        client.log_metrics(run, {"loss": float(step)}, step=step)
    raises_naming("step", client.log_metrics, run, {"loss": 1.0}, step=INT64_MAX + 1)
    raises_naming("step", client.log_metrics, run, {"loss": 1.0}, step=INT64_MIN - 1)
    raises_naming("step", client.log_metrics, run, {"loss": 1.0}, step=np.uint64(2**64 - 1))
    raises_naming("'huge'", client.log_metrics, run, {"loss": 1.0, "huge": 10**400}, step=3)
    raises_naming("'frac'", client.log_metrics, run, {"frac": Fraction(10**400)}, step=3)
    raises_naming("start_time", client.create_run, experiment_id, start_time=INT64_MAX + 1)
    raises_naming("end_time", client.set_terminated, run, "FAILED", end_time=INT64_MIN - 1)
    # The limits themselves, NaN and NumPy numbers are fine.
    client.log_metrics(run, {"edge": 10**300, "np": np.float64(1e308)}, step=INT64_MAX)
    client.log_metrics(run, {"edge": -1.5, "np": np.int64(-7)}, step=INT64_MIN)
    client.log_metrics(run, {"nan": float("nan")}, step=1)
    client.set_terminated(run, "FINISHED")
    client.flush()
    run_id = run.resolve()
    assert history(store, run_id, "loss") == [(step, float(step)) for step in range(20)]
    assert history(store, run_id, "edge") == [(INT64_MIN, -1.5), (INT64_MAX, 1e300)]
    assert history(store, run_id, "np") == [(INT64_MIN, -7.0), (INT64_MAX, 1e308)]
    assert set(run_data(store, run_id)[1]) == {"loss", "edge", "np", "nan"}
    assert store.get_run(run_id).info.status == "FINISHED"
    assert len(runs_of(store, experiment_id)) == 1  # the bad create_run queued nothing


# -- 3. strings that cannot be encoded --------------------------------------------------


def test_strings_that_cannot_be_encoded_raise_naming_the_key(client, store, experiment_id):
    lone = "\ud800"
    run = client.create_run(experiment_id, tags={"team": "a"}, run_name="good")
    client.log_metrics(run, {"m": 1.0}, step=0)
    client.log_params(run, {"p": "ok"})
    client.set_tags(run, {"t": "ok"})
    raises_naming("'bad'", client.log_params, run, {"q": "ok", "bad": "x" + lone})
    raises_naming("'bad'", client.set_tags, run, {"u": "ok", "bad": lone})
    raises_naming("'bad", client.log_params, run, {"bad" + lone: "x"})
    raises_naming("'m", client.log_metrics, run, {"m" + lone: 1.0})
    raises_naming("'bad'", client.create_run, experiment_id, tags={"bad": lone})
    raises_naming("run_name", client.create_run, experiment_id, run_name=lone)
    raises_naming("experiment_id", client.create_run, lone)
    dataset = Dataset(lone, "d1g3st", "local", "{}")
    raises_naming("name", client.log_inputs, run, [DatasetInput(dataset)])
    dataset = Dataset("digits", "d1g3st", "local", "{}")
    tagged = DatasetInput(dataset, [InputTag("mlflow.data.context", lone)])
    raises_naming("mlflow.data.context", client.log_inputs, run, [tagged])
    named = mlflow.data.from_numpy(np.zeros(3), name=lone)
    raises_naming("dataset", client.log_metrics, run, {"m": 2.0}, step=1, dataset=named)
    raises_naming("model_id", client.log_metrics, run, {"m": 2.0}, step=1, model_id=lone)
    client.log_metrics(run, {"m": 3.0}, step=2)
    client.set_terminated(run, "FINISHED")
    client.flush()
    (stored,) = runs_of(store, experiment_id)  # no bad create_run left a run behind
    run_id = run.resolve()
    assert stored.info.run_id == run_id and stored.info.run_name == "good"
    assert run_data(store, run_id) == ({"p": "ok"}, {"m": 3.0}, {"team": "a", "t": "ok"})
    assert history(store, run_id, "m") == [(0, 1.0), (2, 3.0)]
    assert store.get_run(run_id).inputs.dataset_inputs == []
    assert stored.info.status == "FINISHED"
