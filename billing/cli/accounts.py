"""`flask billing sync_periods`: billing accounts' periods copied from Stripe."""

from __future__ import annotations

import sys

import click
from flask.cli import with_appcontext

from billing.accounts import sync_all_periods
from billing.cli.core import emit, operator_errors, runtime


@click.command("sync_periods")
@with_appcontext
def sync_periods_command() -> None:
    """Copy every subscription's current billing period from Stripe to its billing account."""
    rt = runtime()
    with operator_errors():
        summary = sync_all_periods(rt)
    emit(
        summary,
        f"synced {summary['synced']} of {summary['accounts']} account(s), "
        f"{len(summary['changed'])} changed, {len(summary['failed'])} failed",
    )
    if summary["failed"]:
        sys.exit(1)


COMMANDS = (sync_periods_command,)
