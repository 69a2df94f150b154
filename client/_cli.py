"""The ``runactors`` command line."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="runactors")
def main() -> None:
    """runactors: fast, safe MLflow tracking through per-run actors."""
