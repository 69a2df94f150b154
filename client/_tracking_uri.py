"""Tracking URIs: checked and made absolute once, when a client is made.

A client is pickled into workers whose current folder may differ, so a relative SQLite or
file-store path is made absolute here, in the process that made the client (as MLflow does
for its own default). A URI that cannot work (a scheme MLflow has no tracking store for, an
HTTP URI without a host, SQLite without a file) is an ``MlflowException`` naming it at once,
instead of MLflow's model-registry message or a hung request at the first flush. Nothing
here opens or creates the store.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from typing import Any
from urllib.request import pathname2url

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

# Schemes whose stores are SQLAlchemy databases (MLflow's ``DATABASE_ENGINES``).
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
# URIs that MLflow's registry takes whole, as their own scheme.
_NAMED_STORES = ("databricks", "databricks-uc", "uc")
_EXAMPLES = "e.g. sqlite:///mlflow.db, http://HOST:PORT or a folder for a file store"
# A path that reads as a server's address: HOST:PORT (a host MLflow takes as a path: one
# starting with a digit), or a bare localhost or IPv4 address, with an optional path.
_SERVER_ADDRESS = re.compile(r"^(?:[\w.-]+:\d{1,5}|localhost|\d{1,3}(?:\.\d{1,3}){3})(?:/.*)?$")

_logger = logging.getLogger("runactors.tracking_uri")


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI a client uses: ``uri``, or MLflow's own resolution when ``None``
    (``mlflow.set_tracking_uri``, then ``MLFLOW_TRACKING_URI``, then its default); checked
    and with any relative SQLite or file-store path made absolute.

    Raises ``MlflowException`` (``INVALID_PARAMETER_VALUE``) naming the URI.
    """
    if uri is None:
        import mlflow

        resolved = mlflow.get_tracking_uri()
        origin = " (MLflow's tracking URI: mlflow.set_tracking_uri() or MLFLOW_TRACKING_URI)"
    else:
        resolved, origin = uri, ""
    if not isinstance(resolved, str):
        raise _invalid(f"Invalid tracking_uri {resolved!r}: expected a string.")
    try:
        check_tracking_uri(resolved)
    except MlflowException as exc:
        raise _invalid(exc.message + origin) from None
    absolute = absolute_tracking_uri(resolved)
    if _scheme_or_none(resolved) == "" and _SERVER_ADDRESS.match(resolved):
        # MLflow takes it for a folder: a file store, silently, where a server was meant.
        _logger.warning(
            "The tracking URI %r has no scheme, so it is a file store in the folder %s; "
            "for the tracking server at that address, use %r.",
            resolved,
            absolute,
            f"http://{resolved}",
        )
    return absolute


def check_tracking_uri(uri: str) -> None:
    """Raise ``MlflowException`` if ``uri`` is malformed or has no MLflow tracking store."""
    if not uri.strip():
        raise _invalid(f"Invalid tracking URI {uri!r}: it is empty; {_EXAMPLES}.")
    if uri != uri.strip():
        raise _invalid(f"Invalid tracking URI {uri!r}: it has leading or trailing whitespace.")
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        _check_http(uri)
    elif scheme in _DATABASES:
        _check_database(uri, scheme)
    elif scheme in ("", "file") and not _file_path(uri):
        raise _invalid(f"Invalid tracking URI {uri!r}: a file store needs a folder.")


def sqlite_path(uri: str) -> str | None:
    """The database file of a SQLite URI as given (maybe relative); ``None`` for other stores.

    Raises ``MlflowException`` for an in-memory database: every flush (and every worker
    process) would see a different, empty store.
    """
    if _scheme_or_none(uri) != "sqlite":
        return None
    database = _database_url(uri).database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        raise _invalid(
            f"Invalid tracking URI {uri!r}: an in-memory SQLite store cannot be shared by "
            "flushes and worker processes; give a file, e.g. sqlite:///mlflow.db."
        )
    return str(database)


def absolute_tracking_uri(uri: str) -> str:
    """``uri`` with a relative SQLite or file-store path made absolute against the current
    folder; any other URI unchanged. ``uri`` must have passed :func:`check_tracking_uri`."""
    scheme = _scheme_or_none(uri)
    if scheme == "sqlite":
        database = sqlite_path(uri)
        assert database is not None
        if os.path.isabs(database):
            return uri
        prefix = uri.split(":", 1)[0]  # keeps a dialect: sqlite+pysqlite
        query = uri.partition("?")[1] + uri.partition("?")[2]
        return f"{prefix}:///{pathname2url(os.path.abspath(database))}{query}"
    if scheme == "":
        return uri if os.path.isabs(uri) else os.path.abspath(uri)
    if scheme == "file":
        path = _file_path(uri)
        if os.path.isabs(path):
            return uri
        return "file://" + pathname2url(os.path.abspath(path))
    return uri


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, INVALID_PARAMETER_VALUE)


def _scheme_or_none(uri: str) -> str | None:
    try:
        return _scheme(uri)
    except MlflowException:
        return None


def _scheme(uri: str) -> str:
    """The store scheme MLflow picks for ``uri`` (``""`` for a path), checked against
    MLflow's tracking store registry, plugins included, without building the store."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException
    from mlflow.utils.uri import get_uri_scheme

    try:
        _tracking_store_registry.get_store_builder(uri)  # the lookup only: builds nothing
        return uri if uri in _NAMED_STORES else str(get_uri_scheme(uri))
    except UnsupportedModelRegistryStoreURIException:
        # MLflow's text speaks of the model registry; say what is wrong with this URI.
        scheme = urllib.parse.urlparse(uri).scheme
        registered = getattr(_tracking_store_registry, "_registry", {})
        supported = ", ".join(sorted(s for s in registered if s)) or "none"
        reason = (
            f"MLflow has no store for the scheme {scheme!r} (supported: {supported}, or a folder)"
        )
    except Exception as exc:  # e.g. an unknown database dialect
        reason = " ".join(str(getattr(exc, "message", exc)).split())
    raise _invalid(f"Invalid tracking URI {uri!r}: {reason}; {_EXAMPLES}.")


def _check_http(uri: str) -> None:
    parsed = urllib.parse.urlparse(uri)
    try:
        parsed.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise _invalid(f"Invalid tracking URI {uri!r}: {exc}.") from None
    if not parsed.hostname:
        raise _invalid(
            f"Invalid tracking URI {uri!r}: an HTTP tracking server URI needs a host, "
            "e.g. http://127.0.0.1:5000."
        )


def _database_url(uri: str) -> Any:
    from sqlalchemy.engine import make_url

    try:
        return make_url(uri)
    except Exception as exc:
        raise _invalid(f"Invalid tracking URI {uri!r}: {exc}.") from None


def _check_database(uri: str, scheme: str) -> None:
    if scheme == "sqlite":
        sqlite_path(uri)  # raises for an in-memory or missing database
    else:
        _database_url(uri)


def _file_path(uri: str) -> str:
    if _scheme_or_none(uri) == "file":
        return urllib.parse.unquote(urllib.parse.urlparse(uri).path)
    return uri
