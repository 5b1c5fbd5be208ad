"""Billing accounts: which organization is which Stripe customer, and the subscription's status
and current period copied from Stripe.

Stripe is the source of truth; the stored period is a cache that the claim (an hour split at the
period boundary), smoke checks and invoice-time adjustments read. It is read from the
subscription items, where the API version stripe-python pins keeps it
(`items.data[].current_period_start/end`). Webhook deliveries arrive out of order, so a
subscription is always re-read from Stripe while its account row is locked (`sync_subscription`):
an old event arriving late writes today's state, and two events of one subscription cannot
interleave a stale read with a fresh write. `flask billing sync_periods` runs `sync_all_periods`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from billing import logs
from billing.errors import OperatorError
from billing.models import BillableEvent, BillingAccount
from billing.runtime import Runtime
from billing.stripe_gateway import StripeGatewayError, subscription_period

log = logs.get_logger("billing.periods")


LIVE_SUBSCRIPTION_STATUSES = frozenset({"active", "trialing", "past_due"})


class AccountConflictError(OperatorError):
    """A Stripe customer is already linked to another organization: an operator decides."""


def account_for_customer(
    session: Session, customer_id: str | None, *, lock: bool = False
) -> BillingAccount | None:
    if not customer_id:
        return None
    query = sa.select(BillingAccount).where(BillingAccount.stripe_customer_id == customer_id)
    return session.scalars(query.with_for_update() if lock else query).first()


def organization_for_customer(runtime: Runtime, customer_id: str | None) -> int | None:
    with runtime.session_factory() as session:
        account = account_for_customer(session, customer_id)
        organization_id = account.organization_id if account else None
    if organization_id is None:
        log.warning(logs.WEBHOOK_UNLINKED_CUSTOMER, extra={"stripe_customer_id": customer_id})
    return organization_id


def link_account(
    runtime: Runtime, organization_id: int, customer_id: str, subscription_id: str | None
) -> None:
    """The organization's account names the customer (and subscription). A concurrent first link
    of the same organization raises IntegrityError: retried, it finds the row."""
    with runtime.session_factory.begin() as session:
        owner = account_for_customer(session, customer_id, lock=True)
        if owner is not None and owner.organization_id != organization_id:
            raise AccountConflictError(
                f"customer {customer_id} already belongs to organization "
                f"{owner.organization_id}, not {organization_id}"
            )
        account = session.get(BillingAccount, organization_id, with_for_update=True)
        if account is None:
            account = BillingAccount(organization_id=organization_id)
            session.add(account)
        account.stripe_customer_id = customer_id
        if subscription_id:
            account.stripe_subscription_id = subscription_id
    log.info(
        logs.ACCOUNT_LINKED,
        extra={
            "organization_id": organization_id,
            "stripe_customer_id": customer_id,
            "stripe_subscription_id": subscription_id,
        },
    )


class PeriodSyncError(LookupError, OperatorError):
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


def sync_subscription(
    runtime: Runtime, subscription_id: str, customer_id: str | None = None
) -> int | None:
    """Write Stripe's current status and period of the subscription to its customer's billing
    account; the organization, or None when no account has that customer (logged)."""
    if customer_id is None:
        customer_id = _customer_of(runtime.stripe.retrieve_subscription(subscription_id))
    with runtime.session_factory.begin() as session:
        account = account_for_customer(session, customer_id, lock=True)
        if account is None:
            log.warning(
                logs.WEBHOOK_UNLINKED_CUSTOMER,
                extra={
                    "stripe_customer_id": customer_id,
                    "stripe_subscription_id": subscription_id,
                },
            )
            return None
        # Read Stripe while holding the account row, so this write is never older than one
        # made concurrently for another event of the same subscription.
        subscription = runtime.stripe.retrieve_subscription(subscription_id)
        organization_id = account.organization_id
        if not _tracks(account, subscription):
            return organization_id
        _write(account, subscription)
    log.info(
        logs.SUBSCRIPTION_SYNCED,
        extra={
            "organization_id": organization_id,
            "stripe_subscription_id": subscription_id,
            "status": subscription.status,
        },
    )
    return organization_id


def _customer_of(subscription: Any) -> str:
    customer = subscription.customer
    return customer if isinstance(customer, str) else customer.id


def _tracks(account: BillingAccount, subscription: Any) -> bool:
    """The account follows one subscription; a new live one replaces one that is over."""
    if account.stripe_subscription_id in (None, subscription.id):
        return True
    return (
        subscription.status in LIVE_SUBSCRIPTION_STATUSES
        and account.subscription_status not in LIVE_SUBSCRIPTION_STATUSES
    )


def _write(account: BillingAccount, subscription: Any) -> None:
    account.stripe_subscription_id = subscription.id
    account.subscription_status = subscription.status
    period = subscription_period(subscription)
    if period is not None:  # keep the last known period rather than blank it
        account.current_period_start, account.current_period_end = period


def store_subscription(runtime: Runtime, organization_id: int, subscription: Any) -> PeriodSync:
    """Write a subscription's id, status and current period onto the organization's account."""
    with runtime.session_factory.begin() as session:
        account = session.get(BillingAccount, organization_id, with_for_update=True)
        if account is None:
            raise PeriodSyncError(f"organization {organization_id} has no billing account")
        before = _state(account)
        _write(account, subscription)
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


class UnknownOrganizationError(LookupError, OperatorError):
    """No billing account and no billable events: the id names no organization billing knows."""


def require_known_organization(runtime: Runtime, organization_id: int) -> None:
    """A typo in `--org-id` must say so, not report an empty flush as a success."""
    with runtime.session_factory() as session:
        known = session.get(BillingAccount, organization_id) is not None or session.scalar(
            sa.select(sa.exists().where(BillableEvent.organization_id == organization_id))
        )
    if not known:
        raise UnknownOrganizationError(
            f"organization {organization_id} is unknown: no billing account and no billable events"
        )
