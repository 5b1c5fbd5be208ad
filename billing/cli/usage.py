"""`flask billing usage …`: billable events the flush set aside, and what an operator does with
them. Thin commands over `billing.unbillable`."""

from __future__ import annotations

import json

import click
from flask.cli import AppGroup

from billing.checks.billability import REASONS
from billing.checks.report import render_table
from billing.cli.core import ACTOR, emit, operator_errors, runtime
from billing.usage.unbillable import (
    DEFAULT_LIMIT,
    DismissalError,
    dismiss_unbillable,
    list_unbillable,
)


@click.group("usage", cls=AppGroup)
def usage_cli() -> None:
    """Billable events: the ones the flush set aside as unbillable, and dismissing them."""


@usage_cli.command("unbillable")
@click.option("--org-id", type=int, default=None, help="One organization only.")
@click.option("--reason", type=click.Choice(REASONS), default=None, help="One reason only.")
@click.option("--limit", type=click.IntRange(min=1, max=100_000), default=DEFAULT_LIMIT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def unbillable_command(org_id: int | None, reason: str | None, limit: int, as_json: bool) -> None:
    """List pending rows the flush sets aside, with their reason (counts by reason, then rows
    by id). They stay pending: fix them and the next flush bills them, or dismiss them."""
    rt = runtime()
    with operator_errors(DismissalError):
        listing = list_unbillable(rt, organization_id=org_id, reason=reason, limit=limit)
    if as_json:
        click.echo(json.dumps(listing.to_dict(), indent=2, sort_keys=True, default=str))
        return
    counts = ", ".join(f"{r} {n}" for r, n in listing.counts.items() if n) or "none"
    click.echo(f"unbillable (set aside, pending): {counts}")
    if listing.total > len(listing.events):
        click.echo(f"showing {len(listing.events)} of {listing.total} rows (--limit)", err=True)
    if listing.events:
        headers = ("id", "reason", "org", "event_type", "quantity", "occurred_at")
        rows = [
            (
                e["id"],
                e["reason"],
                e["organization_id"],
                e["event_type"],
                e["quantity"],
                e["occurred_at"],
            )
            for e in listing.events
        ]
        click.echo(render_table(headers, rows))


@usage_cli.command("dismiss")
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@click.option("--org-id", type=int, default=None, help="Every pending unbillable row of it.")
@click.option(
    "--unbillable",
    type=click.Choice(REASONS),
    default=None,
    help="With --org-id: only the rows set aside for this reason.",
)
@click.option("--reason", required=True, help="Why this usage is never billed (kept).")
@ACTOR
def dismiss_command(
    ids: tuple[int, ...], org_id: int | None, unbillable: str | None, reason: str, actor: str
) -> None:
    """Dismiss pending unbillable rows (by billable event id, or an organization's): never
    billed, no longer counted. All or nothing; rows the next flush would bill are refused."""
    if bool(ids) == (org_id is not None):
        raise click.UsageError("give billable event IDS or --org-id (not both)")
    if unbillable is not None and org_id is None:
        raise click.UsageError("--unbillable goes with --org-id")
    rt = runtime()
    with operator_errors(DismissalError):
        result = dismiss_unbillable(
            rt,
            reason=reason,
            actor=actor,
            event_ids=ids,
            organization_id=org_id,
            unbillable=unbillable,
        )
    emit(result.to_dict(), f"{result.event_count} row(s) dismissed")


COMMANDS = (usage_cli,)
