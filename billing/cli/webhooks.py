"""`flask billing webhooks list|replay|sweep`: the stored Stripe events."""

from __future__ import annotations

import sys

import click
from flask.cli import AppGroup

from billing.cli.core import emit, operator_errors, runtime
from billing.models import WebhookStatus
from billing.webhooks import dispatch, service
from billing.webhooks.publish import enqueuer


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
    rt = runtime()
    with operator_errors():
        previous, outcome = dispatch.replay(rt, event_id, force=force)
    emit({"event_id": event_id, "previous_status": previous, "outcome": outcome.value})
    if outcome not in (service.ProcessOutcome.PROCESSED, service.ProcessOutcome.IGNORED):
        sys.exit(1)


@webhooks_cli.command("sweep")
def webhooks_sweep_command() -> None:
    """Queue again the events stuck in received/processing (what beat runs every minute)."""
    rt = runtime()
    with operator_errors():
        result = service.sweep_stuck(rt, enqueuer(rt))
    emit(result.to_dict())
    if result.not_queued:
        sys.exit(1)


COMMANDS = (webhooks_cli,)
