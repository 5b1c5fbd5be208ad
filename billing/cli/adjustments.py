"""`flask billing adjustments add|list|remove|carry-over|waive`: minimum commitments and credits
applied on invoice.created, and the missed ones an operator resolves."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from billing.adjustments import service as adjustments
from billing.cli.core import ACTOR, emit, operator_errors, runtime
from billing.models import AdjustmentKind


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


COMMANDS = (adjustments_cli,)
