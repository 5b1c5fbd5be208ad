"""`flask billing webhooks list|replay|sweep` and `flask billing adjustments add|list|remove`."""

from __future__ import annotations

import sys

import click
from flask.cli import AppGroup

from billing.adjustments import service as adjustments
from billing.cli.core import emit, operator_errors, runtime
from billing.cli.outbox import ACTOR
from billing.models import AdjustmentKind, WebhookStatus
from billing.webhooks import service


@click.group("webhooks", cls=AppGroup)
def webhooks_cli() -> None:
    """Stored Stripe webhook events: inspect, replay dead letters, sweep."""


@webhooks_cli.command("list")
@click.option("--status", type=click.Choice([s.value for s in WebhookStatus]), default=None)
@click.option("--type", "event_type", default=None, help="e.g. invoice.payment_failed")
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=100, show_default=True)
def webhooks_list_command(status: str | None, event_type: str | None, limit: int) -> None:
    """Stored events, newest first, with status, attempts and last error."""
    rt = runtime()
    with operator_errors():
        events = service.list_events(rt, status=status, event_type=event_type, limit=limit)
    emit({"events": events, "count": len(events)}, f"{len(events)} event(s)")


@webhooks_cli.command("replay")
@click.argument("event_id")
@click.option("--force", is_flag=True, help="Also re-run an event already processed.")
def webhooks_replay_command(event_id: str, force: bool) -> None:
    """Run a stored event's handler again now (a dead letter once its cause is fixed)."""
    from billing.webhooks.handlers import HANDLERS, TRANSIENT_ERRORS

    rt = runtime()
    with operator_errors():
        previous = service.reset_for_replay(rt, event_id, force=force)
        try:
            outcome = service.process_event(
                rt, event_id, HANDLERS, final_attempt=True, transient_errors=TRANSIENT_ERRORS
            )
        except TRANSIENT_ERRORS as error:  # only re-raised when not final; kept for safety
            raise click.ClickException(str(error)) from error
    emit({"event_id": event_id, "previous_status": previous, "outcome": outcome.value})
    if outcome not in (service.ProcessOutcome.PROCESSED, service.ProcessOutcome.IGNORED):
        sys.exit(1)


@webhooks_cli.command("sweep")
def webhooks_sweep_command() -> None:
    """Queue again the events stuck in received/processing (what beat runs every minute)."""
    from billing.webhooks.tasks import enqueuer

    rt = runtime()
    with operator_errors():
        result = service.sweep_stuck(rt, enqueuer(rt))
    emit(result.to_dict())
    if result.not_queued:
        sys.exit(1)


@click.group("adjustments", cls=AppGroup)
def adjustments_cli() -> None:
    """Per-organization invoice adjustments applied on invoice.created."""


KIND = click.Choice([k.value for k in AdjustmentKind])


@adjustments_cli.command("add")
@click.option("--org-id", type=int, required=True)
@click.option("--kind", type=KIND, required=True)
@click.option("--amount-cents", type=click.IntRange(min=1), required=True)
@click.option("--currency", default="usd", show_default=True)
def adjustments_add_command(org_id: int, kind: str, amount_cents: int, currency: str) -> None:
    """Add a minimum monthly commitment or a one-off credit."""
    rt = runtime()
    with operator_errors():
        made = adjustments.add_adjustment(rt, org_id, kind, amount_cents, currency)
    emit(made)


@adjustments_cli.command("list")
@click.option("--org-id", type=int, default=None)
@click.option("--all", "include_removed", is_flag=True, help="Include removed adjustments.")
@click.option("--missed", is_flag=True, help="Only adjustments with a missed invoice.")
def adjustments_list_command(org_id: int | None, include_removed: bool, missed: bool) -> None:
    """Adjustments with what each invoice received (`applied[].id` names a row for carry-over
    and waive)."""
    rt = runtime()
    with operator_errors():
        found = adjustments.list_adjustments(rt, org_id, include_removed, missed_only=missed)
    emit({"adjustments": found, "count": len(found)})


@adjustments_cli.command("carry-over")
@click.argument("row_id", type=click.IntRange(min=1))
@ACTOR
def adjustments_carry_over_command(row_id: int, actor: str) -> None:
    """Bill a missed minimum-commitment top-up (ROW_ID from `adjustments list --missed`) on the
    customer's next invoice."""
    rt = runtime()
    with operator_errors():
        emit(adjustments.carry_over_missed(rt, row_id, actor=actor))


@adjustments_cli.command("waive")
@click.argument("row_id", type=click.IntRange(min=1))
@click.option("--reason", required=True, help="Why it is never billed (kept).")
@ACTOR
def adjustments_waive_command(row_id: int, reason: str, actor: str) -> None:
    """Forgive a missed minimum-commitment top-up (ROW_ID from `adjustments list --missed`)."""
    rt = runtime()
    with operator_errors():
        emit(adjustments.waive_missed(rt, row_id, reason=reason, actor=actor))


@adjustments_cli.command("remove")
@click.option("--id", "adjustment_id", type=int, default=None, help="One adjustment by id.")
@click.option("--org-id", type=int, default=None)
@click.option("--kind", type=KIND, default=None)
def adjustments_remove_command(
    adjustment_id: int | None, org_id: int | None, kind: str | None
) -> None:
    """Stop applying adjustments: one by --id, or an organization's (--org-id [--kind])."""
    if adjustment_id is None and org_id is None:
        raise click.UsageError("give --id or --org-id")
    rt = runtime()
    with operator_errors():
        removed = adjustments.remove_adjustments(
            rt, adjustment_id=adjustment_id, organization_id=org_id, kind=kind
        )
    emit({"removed": removed})
