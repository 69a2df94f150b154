"""The tests' throwaway PostgreSQL 15 server: the bench's (``client/bench/_postgres.py``), with
commits not fsynced (the tests check rows, not durability). As root it runs as the
``postgres`` user; the URI it gives (``postgresql+psycopg://...``) is one MLflow accepts as a
tracking URI.
"""

from __future__ import annotations

from client.bench._postgres import LocalPostgres, missing


def missing_binaries() -> str | None:
    """Why the server cannot be started here (binaries, runuser, driver), or None."""
    return missing()


class PostgresServer(LocalPostgres):
    """One PostgreSQL server in its own temp folder; ``start()`` then ``stop()``."""

    def __init__(self) -> None:
        super().__init__(durable=False, prefix="runactors-pg-")
