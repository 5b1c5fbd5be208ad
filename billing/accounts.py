"""Period sync: copy each subscription's current billing period from Stripe to its billing account.

Stripe is the source of truth; the stored period is a cache that smoke checks and invoice-time
adjustments read. The period is read from the subscription items, where the API version that
stripe-python pins keeps it (`items.data[].current_period_start/end`, API 2025-03-31 and later).
Subscription webhooks should call `sync_subscription` (it re-reads the subscription, since
deliveries arrive out of order); `flask billing sync_periods` runs `sync_all_periods`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from billing import logs
from billing.models import BillingAccount
from billing.runtime import Runtime
from billing.stripe_gateway import StripeGatewayError, subscription_period

log = logs.get_logger("billing.periods")


class PeriodSyncError(LookupError):
    """The organization has no billing account or no subscription to sync from."""


@dataclass(frozen=True)
class PeriodSync:
    organization_id: int
    subscription_id: str
    status: str | None
    period_start: datetime | None
    period_end: datetime | None
    changed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "organization_id": self.organization_id,
            "subscription_id": self.subscription_id,
            "status": self.status,
            "current_period_start": _iso(self.period_start),
            "current_period_end": _iso(self.period_end),
            "changed": self.changed,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def sync_period(runtime: Runtime, organization_id: int) -> PeriodSync:
    """Read the organization's subscription from Stripe and store its current period."""
    with runtime.session_factory() as session:
        account = session.get(BillingAccount, organization_id)
        if account is None:
            raise PeriodSyncError(f"organization {organization_id} has no billing account")
        subscription_id = account.stripe_subscription_id
    if not subscription_id:
        raise PeriodSyncError(f"organization {organization_id} has no Stripe subscription")
    subscription = runtime.stripe.retrieve_subscription(subscription_id)
    return store_subscription(runtime, organization_id, subscription)


def sync_subscription(runtime: Runtime, subscription_id: str) -> PeriodSync | None:
    """For subscription webhooks: re-read the subscription and store it on its account.

    The account is found by subscription id, else by customer (a new subscription); None when
    no account matches.
    """
    subscription = runtime.stripe.retrieve_subscription(subscription_id)
    customer = subscription.customer
    customer_id = customer if isinstance(customer, str) else customer.id
    with runtime.session_factory() as session:
        organization_id = session.scalar(
            sa.select(BillingAccount.organization_id)
            .where(
                sa.or_(
                    BillingAccount.stripe_subscription_id == subscription_id,
                    BillingAccount.stripe_customer_id == customer_id,
                )
            )
            # The account already holding this subscription wins over a customer match.
            .order_by((BillingAccount.stripe_subscription_id == subscription_id).desc())
            .limit(1)
        )
    if organization_id is None:
        return None
    return store_subscription(runtime, organization_id, subscription)


def store_subscription(runtime: Runtime, organization_id: int, subscription: Any) -> PeriodSync:
    """Write a subscription's id, status and current period onto the billing account."""
    period = subscription_period(subscription)
    with runtime.session_factory.begin() as session:
        account = session.get(BillingAccount, organization_id, with_for_update=True)
        if account is None:
            raise PeriodSyncError(f"organization {organization_id} has no billing account")
        before = _state(account)
        account.stripe_subscription_id = subscription.id
        account.subscription_status = subscription.status
        if period is not None:  # keep the last known period rather than blank it
            account.current_period_start, account.current_period_end = period
        after = _state(account)
    synced = PeriodSync(
        organization_id, subscription.id, after[1], after[2], after[3], changed=before != after
    )
    log.info(logs.PERIOD_SYNCED, extra=synced.to_dict())
    return synced


def _state(account: BillingAccount) -> tuple[Any, ...]:
    return (
        account.stripe_subscription_id,
        account.subscription_status,
        account.current_period_start,
        account.current_period_end,
    )


def sync_all_periods(runtime: Runtime) -> dict[str, Any]:
    """Sync every account with a subscription; one failing account never stops the others."""
    with runtime.session_factory() as session:
        organization_ids = list(
            session.scalars(
                sa.select(BillingAccount.organization_id)
                .where(BillingAccount.stripe_subscription_id.is_not(None))
                .order_by(BillingAccount.organization_id)
            )
        )
    changed: list[int] = []
    failed: list[dict[str, Any]] = []
    for organization_id in organization_ids:
        try:
            synced = sync_period(runtime, organization_id)
        except (StripeGatewayError, PeriodSyncError) as error:
            log.warning(
                logs.PERIOD_SYNC_FAILED,
                extra={"organization_id": organization_id, "error": str(error)},
            )
            failed.append({"organization_id": organization_id, "error": str(error)})
            continue
        if synced.changed:
            changed.append(organization_id)
    return {
        "accounts": len(organization_ids),
        "synced": len(organization_ids) - len(failed),
        "changed": changed,
        "failed": failed,
    }
