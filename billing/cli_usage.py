"""`flask billing usage …`: billable events the flush set aside, and what an operator does with
them."""

from __future__ import annotations

import click
from flask.cli import AppGroup


@click.group("usage", cls=AppGroup)
def usage_cli() -> None:
    """Billable events: the ones the flush set aside as unbillable, and dismissing them."""
