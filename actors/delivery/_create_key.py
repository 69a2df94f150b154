"""No duplicate runs: finding the run a ``create_run`` of unknown outcome may have made.

A creation whose response was lost (a dropped connection, a timeout, a 5xx, a process killed
mid-call) may or may not have made its run. Before it is sent again it is looked up:

* on a tracking server (``http``/``https`` URIs), each creation carries the tag
  ``runactors.create_key`` (a uuid4 fixed when the creation was queued), and the look-up
  is an exact search on that tag;
* in a local database, runs carry no extra tag (autologging must log identically through
  this client), so the look-up matches what the creation fixed: experiment, start time (in
  ms, fixed when it was queued), run name and tags, and requires the run to be *fresh* (no
  params, no metrics, no tags but the creation's and MLflow's): nothing is sent to a run
  before its ID is known, so a run this creation made is fresh until found. A run the SQL
  fast path made has the create key's hex as its ID, and is looked up by it first.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from actors.queueing._queues import CreateRunCall

_logger = logging.getLogger("runactors.delivery")

CREATE_KEY_TAG = "runactors.create_key"
_PAGE = 1000


def uses_create_key_tag(tracking_uri: str) -> bool:
    """Whether runs created through ``tracking_uri`` carry :data:`CREATE_KEY_TAG`."""
    return urlparse(tracking_uri).scheme.lower() in ("http", "https")


def creation_with_key(tracking_uri: str, create: CreateRunCall, create_key: str) -> CreateRunCall:
    """The creation to send: with the create-key tag on a tracking server, as is elsewhere."""
    if not uses_create_key_tag(tracking_uri):
        return create
    tags = [pair for pair in create.tags if pair[0] != CREATE_KEY_TAG]
    return create._replace(tags=[*tags, (CREATE_KEY_TAG, create_key)])


def _search(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ALL,
            max_results=_PAGE,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _is_fresh_match(run: Any, create: CreateRunCall) -> bool:
    data = run.data
    if data.params or data.metrics:
        return False
    if create.run_name is not None and run.info.run_name != create.run_name:
        return False
    wanted = dict(create.tags)
    if any(data.tags.get(key) != value for key, value in wanted.items()):
        return False
    return all(key in wanted or key.startswith("mlflow.") for key in data.tags)


def _run_with_key_id(client: Any, create: CreateRunCall, create_key: str) -> str | None:
    """The run the SQL fast path made for this creation: its ID is the create key's hex
    (:mod:`actors.delivery._sql_runs`), and it may already hold metrics, so the look-up
    for a fresh run below would miss it."""
    try:
        run_id = uuid.UUID(create_key).hex
    except ValueError:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return run_id if run.info.experiment_id == create.experiment_id else None


def find_created_run(
    client: Any,
    tracking_uri: str,
    create: CreateRunCall,
    create_key: str,
    exclude: Collection[str] = (),
) -> str | None:
    """The ID of the run that this creation made, or None if it made none.

    ``client`` is an ``MlflowClient`` on ``tracking_uri``; ``exclude`` are run IDs known to
    belong to other creations (a local look-up never returns them). Raises what the store
    raises (a transient failure is retried by the caller like any call).
    """
    if uses_create_key_tag(tracking_uri):
        found = _search(client, create.experiment_id, f"tags.`{CREATE_KEY_TAG}` = '{create_key}'")
    else:
        made = _run_with_key_id(client, create, create_key)
        if made is not None:
            return made
        if create.start_time is None:
            raise ValueError("a creation without start_time cannot be looked up in a local store")
        found = [
            run
            for run in _search(
                client, create.experiment_id, f"attributes.start_time = {int(create.start_time)}"
            )
            if run.info.run_id not in exclude and _is_fresh_match(run, create)
        ]
    if not found:
        return None
    if len(found) > 1:
        _logger.warning(
            "Creation %s matches %d runs (%s); using the oldest, %s.",
            create_key,
            len(found),
            ", ".join(run.info.run_id for run in found),
            found[0].info.run_id,
        )
    return str(found[0].info.run_id)
