"""`flask billing entitlements grant|revoke|list|refresh`: thin commands over the service."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from billing.cli.core import emit, operator_errors, runtime
from billing.entitlements import SAAS_FEATURE, checkout, service

ORG_ID = click.option("--org-id", type=click.IntRange(min=1), required=True)
FEATURE = click.option(
    "--feature", default=SAAS_FEATURE, show_default=True, help="The feature's Stripe lookup key."
)


@click.group("entitlements", cls=AppGroup)
def entitlements_cli() -> None:
    """Features organizations hold: from Stripe (refreshed) and granted by hand."""


@entitlements_cli.command("grant")
@ORG_ID
@FEATURE
@click.option("--note", default=None, help="Why (contract, ticket); kept with the grant.")
def grant_command(org_id: int, feature: str, note: str | None) -> None:
    """Grant FEATURE to an organization by hand; a Stripe refresh never removes it."""
    rt = runtime()
    with operator_errors():
        record = service.grant_manual(rt, org_id, feature, note)
    emit(record.to_dict(), f"granted {record.feature} to organization {org_id} (manual)")


@entitlements_cli.command("revoke")
@ORG_ID
@FEATURE
def revoke_command(org_id: int, feature: str) -> None:
    """Revoke a manual grant. Exit 1 when the organization has no active manual grant."""
    rt = runtime()
    with operator_errors():
        result = service.revoke_manual(rt, org_id, feature)
    emit(result.to_dict())
    if result.still_entitled:
        click.echo(
            f"warning: organization {org_id} still holds {feature} from Stripe "
            "(cancel the subscription there to take it away)",
            err=True,
        )


@entitlements_cli.command("list")
@click.option("--org-id", type=click.IntRange(min=1), default=None, help="One organization only.")
@click.option("--all", "include_inactive", is_flag=True, help="Include revoked rows.")
def list_command(org_id: int | None, include_inactive: bool) -> None:
    """List entitlements with their source (stripe or manual) as JSON."""
    rt = runtime()
    with operator_errors():
        records = service.list_entitlements(rt, org_id, include_inactive=include_inactive)
    emit({"entitlements": [record.to_dict() for record in records]})


@entitlements_cli.command("refresh")
@ORG_ID
def refresh_command(org_id: int) -> None:
    """Re-read the organization's active entitlements from Stripe now (manual grants stay)."""
    rt = runtime()
    with operator_errors():
        keys = service.refresh_from_stripe(rt, org_id)
    emit({"organization_id": org_id, "stripe_lookup_keys": sorted(keys)})


@entitlements_cli.command("demo_price")
@click.option("--amount-cents", type=click.IntRange(min=0), default=4900, show_default=True)
@click.option("--currency", default="usd", show_default=True)
def demo_price_command(amount_cents: int, currency: str) -> None:
    """Create a monthly price whose product grants `saas` (Stripe test mode only).

    Prints the price id to set as STRIPE_SAAS_PRICE_ID (scripts/demo_saas.sh does).
    """
    rt = runtime()
    with operator_errors():
        price_id = checkout.create_demo_price(rt, amount_cents=amount_cents, currency=currency)
    emit({"price_id": price_id, "feature": SAAS_FEATURE})


COMMANDS = (entitlements_cli,)
