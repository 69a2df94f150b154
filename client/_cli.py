"""The ``runactors`` command line."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="runactors")
def main() -> None:
    """runactors: fast, safe MLflow tracking through per-run actors."""


from client.bench import bench  # noqa: E402  (the group above must exist first)

main.add_command(bench)
from client._replay import replay  # noqa: E402

main.add_command(replay)
from client.sweep.command import sweep  # noqa: E402

main.add_command(sweep)
from client._status_command import status  # noqa: E402

main.add_command(status)


if __name__ == "__main__":
    main()
