"""`flask billing usage …`: billable events the flush set aside, and what an operator does with
them (thin commands over `billing.usage.unbillable`); usage corrections, recorded and listed
(over `billing.usage.corrections` and `billing.usage.correcting`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click
from flask.cli import AppGroup

from billing.checks.billability import REASONS
from billing.checks.report import render_table
from billing.cli.core import ACTOR, emit, operator_errors, runtime
from billing.usage.correcting import settle_held_correction
from billing.usage.corrections import (
    NEXT_FLUSH,
    CorrectionRequest,
    list_corrections,
    record_correction,
)
from billing.usage.unbillable import (
    DEFAULT_LIMIT,
    DismissalError,
    dismiss_unbillable,
    list_unbillable,
)


@click.group("usage", cls=AppGroup)
def usage_cli() -> None:
    """Billable events: the ones the flush set aside as unbillable, dismissing them, and
    corrections of billed usage."""


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


class Hour(click.ParamType):
    """An ISO 8601 time (UTC when it names no offset): `2026-12-01T10:00Z`."""

    name = "ISO"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time (e.g. 2026-12-01T10:00Z)", param, ctx)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@usage_cli.command("correct")
@click.option("--org-id", type=int, required=True)
@click.option("--event-type", required=True, help="A type of STRIPE_BILLING_METERS.")
@click.option("--hour", type=Hour(), required=True, help="Start of the hour (UTC, ISO 8601).")
@click.option(
    "--delta",
    type=int,
    required=True,
    help="By how much the billed total changes: negative retracts.",
)
@click.option("--reason", required=True, help="Why (kept, and on a credit's invoice line).")
@click.option(
    "--idempotency-key",
    default=None,
    help="Makes a repeat a no-op. Default: derived from the values (two alike need two keys).",
)
@click.option("--dry-run", is_flag=True, help="Check and print what would be sent; record nothing.")
@ACTOR
def correct_command(
    org_id: int,
    event_type: str,
    hour: datetime,
    delta: int,
    reason: str,
    idempotency_key: str | None,
    dry_run: bool,
    actor: str,
) -> None:
    """Record a correction of billed usage for one organization, event type and hour; the next
    flush applies it once: recent meter events are cancelled and the total re-sent, older ones
    get a correcting event, an invoiced period a credit. Refused (exit 1, nothing recorded): a
    retraction above what was billed, a positive correction of an invoiced period, and more."""
    rt = runtime()
    request = CorrectionRequest(
        organization_id=org_id,
        event_type=event_type,
        hour=hour,
        delta=delta,
        reason=reason,
        actor=actor,
        idempotency_key=idempotency_key,
    )
    with operator_errors():
        shown = record_correction(rt, request, dry_run=dry_run)
    if dry_run:
        emit(shown, f"would be {shown['method_as_of_now']}; nothing was recorded")
    else:
        emit(shown, f"correction {shown['id']} {shown['status']}: {NEXT_FLUSH}")


@usage_cli.group("corrections", cls=AppGroup)
def corrections_cli() -> None:
    """Usage corrections: what each sent, and settling a held one."""


@corrections_cli.command("list")
@click.option("--org-id", type=int, default=None, help="One organization only.")
@click.option("--limit", type=click.IntRange(min=1, max=100_000), default=DEFAULT_LIMIT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def corrections_list_command(org_id: int | None, limit: int, as_json: bool) -> None:
    """Corrections, newest first, with status, method and what was sent (cancelled meter
    events, the new one, or the credit), then the upstream rows rejected with their reason."""
    rt = runtime()
    with operator_errors():
        listing = list_corrections(rt, organization_id=org_id, limit=limit)
    if as_json:
        click.echo(json.dumps(listing, indent=2, sort_keys=True, default=str))
        return
    counts = ", ".join(f"{s} {n}" for s, n in listing["counts"].items() if n) or "none"
    click.echo(f"usage corrections: {counts}")
    if listing["corrections"]:
        headers = ("id", "status", "method", "org", "event_type", "hour", "delta", "sent", "actor")
        rows = [
            (
                c["id"],
                c["status"],
                c["method"] or "-",
                c["organization_id"],
                c["event_type"],
                c["hour"],
                c["delta"],
                _sent_text(c["sent"]),
                c["actor"],
            )
            for c in listing["corrections"]
        ]
        click.echo(render_table(headers, rows))
    if listing["rejected_upstream"]:
        click.echo("rejected upstream rows (billable_event_corrections):")
        headers = ("id", "org", "event_type", "hour", "delta", "rejected_reason")
        rows = [
            (
                r["id"],
                r["organization_id"],
                r["event_type"],
                r["hour"],
                r["delta"],
                r["rejected_reason"],
            )
            for r in listing["rejected_upstream"]
        ]
        click.echo(render_table(headers, rows))


def _sent_text(sent: dict) -> str:
    parts = [
        f"cancelled {c['identifier']} ({c['value']}, {c['status']})"
        for c in sent.get("cancelled", [])
    ]
    if "meter_event" in sent:
        event = sent["meter_event"]
        parts.append(f"event {event['identifier']} value {event['value']} ({event['status']})")
    if "credit" in sent:
        credit = sent["credit"]
        parts.append(
            f"credit {credit['amount_cents']} {credit['currency']} #{credit['adjustment_id']}"
        )
    return "; ".join(parts) or "-"


@corrections_cli.command("settle")
@click.argument("correction_id", type=click.IntRange(min=1))
@click.option(
    "--cancelled/--not-cancelled",
    required=True,
    help="What Stripe's summaries show: the held cancels took effect, or not.",
)
@click.option("--reason", required=True, help="What you compared (kept).")
@ACTOR
def corrections_settle_command(
    correction_id: int, cancelled: bool, reason: str, actor: str
) -> None:
    """Settle a held correction (a cancel whose outcome is unknown) after comparing Stripe's
    meter event summaries for its hour; the next flush sends the corrected total."""
    rt = runtime()
    with operator_errors():
        emit(
            settle_held_correction(
                rt, correction_id, cancelled=cancelled, actor=actor, reason=reason
            )
        )


COMMANDS = (usage_cli,)
