"""The entitlement store: one check, fed by Stripe and by operators, each source kept apart.

Access is decided only from the local table, never by calling Stripe, so the gate is one indexed
lookup and a Stripe outage never locks out an organization that is entitled. Stripe's view is
copied in by `refresh_from_stripe` (the webhook handler of
`entitlements.active_entitlement_summary.updated` calls it, and so can an operator); it rewrites
only the organization's `stripe` rows, so a manual grant survives every refresh.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing import logs
from billing.errors import OperatorError
from billing.models import BillingAccount, Entitlement, EntitlementSource, utcnow
from billing.runtime import Runtime

log = logs.get_logger("billing.entitlements")

MAX_LOOKUP_KEY_LENGTH = 80  # Stripe's limit for a feature's lookup_key
MAX_NOTE_LENGTH = 500
# pg_advisory_xact_lock's first key: "bill" in ASCII, so billing's locks never collide with others.
_ADVISORY_NAMESPACE = 0x62696C6C


class EntitlementError(ValueError, OperatorError):
    """Bad input for an entitlement operation (unknown feature, nothing to revoke)."""


@dataclass(frozen=True)
class EntitlementRecord:
    organization_id: int
    feature: str
    source: str
    active: bool
    note: str | None
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RevokeResult:
    organization_id: int
    feature: str
    revoked: bool
    # Revoking the manual grant does not lock an organization that Stripe also entitles.
    still_entitled: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_feature(feature: str) -> str:
    feature = feature.strip()
    if not feature or len(feature) > MAX_LOOKUP_KEY_LENGTH:
        raise EntitlementError(
            f"feature must be a Stripe lookup key of 1 to {MAX_LOOKUP_KEY_LENGTH} characters, "
            f"got {feature!r}"
        )
    return feature


def _active_query(organization_id: int, feature: str) -> Select[tuple[int]]:
    return (
        select(Entitlement.id)
        .where(
            Entitlement.organization_id == organization_id,
            Entitlement.lookup_key == feature,
            Entitlement.active.is_(True),
        )
        .limit(1)
    )


def has_entitlement(
    runtime_or_session: Runtime | Session, organization_id: int, feature: str
) -> bool:
    """Whether the organization holds `feature` from any source: one indexed lookup, no Stripe."""
    query = _active_query(organization_id, feature)
    if isinstance(runtime_or_session, Session):
        return runtime_or_session.scalar(query) is not None
    with runtime_or_session.session_factory() as session:
        return session.scalar(query) is not None


def _serialize_per_organization(session: Session, organization_id: int) -> None:
    """Writers of one organization's entitlements take turns until their transaction ends.

    Two refreshes racing (a webhook and an operator) could otherwise commit Stripe's older answer
    last. An advisory lock rather than a row lock: the caller may hold the billing account row in
    its own open transaction (the webhook handler linking the customer), and waiting on it from a
    second connection would deadlock. SQLite (the embedded default) has one writer at a time.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:namespace, CAST(:key AS integer))"),
            {"namespace": _ADVISORY_NAMESPACE, "key": organization_id % 2_147_483_647},
        )


def refresh_from_stripe(runtime: Runtime, organization_id: int) -> set[str]:
    """Copy the organization's active Stripe entitlements into its `stripe` rows; their keys.

    Lists `GET /v1/entitlements/active_entitlements` for the organization's Stripe customer (every
    page) and, in one transaction, activates the keys Stripe lists and deactivates the other
    `stripe` rows. `manual` rows are never read or written here. A Stripe error propagates
    (TransientStripeError: retry) and changes nothing, so an outage never revokes access.
    """
    with runtime.session_factory.begin() as session:
        _serialize_per_organization(session, organization_id)
        customer_id = session.scalar(
            select(BillingAccount.stripe_customer_id).where(
                BillingAccount.organization_id == organization_id
            )
        )
        # Called inside the transaction on purpose: the lock must cover read and write, so the
        # last writer is the one that asked Stripe last.
        keys = runtime.stripe.active_entitlement_lookup_keys(customer_id) if customer_id else set()
        granted, revoked = _replace_stripe_rows(session, organization_id, keys)
    log.info(
        logs.ENTITLEMENTS_REFRESHED,
        extra={
            "organization_id": organization_id,
            "stripe_customer_id": customer_id,
            "lookup_keys": sorted(keys),
            "granted": granted,
            "revoked": revoked,
        },
    )
    return keys


def _replace_stripe_rows(
    session: Session, organization_id: int, keys: set[str]
) -> tuple[list[str], list[str]]:
    rows = session.scalars(
        select(Entitlement).where(
            Entitlement.organization_id == organization_id,
            Entitlement.source == EntitlementSource.STRIPE.value,
        )
    ).all()
    granted: list[str] = []
    revoked: list[str] = []
    for row in rows:
        wanted = row.lookup_key in keys
        if row.active != wanted:
            row.active = wanted
            (granted if wanted else revoked).append(row.lookup_key)
    known = {row.lookup_key for row in rows}
    for key in sorted(keys - known):
        session.add(
            Entitlement(
                organization_id=organization_id,
                lookup_key=key,
                source=EntitlementSource.STRIPE.value,
                active=True,
            )
        )
        granted.append(key)
    return sorted(granted), sorted(revoked)


def grant_manual(
    runtime: Runtime, organization_id: int, feature: str, note: str | None = None
) -> EntitlementRecord:
    """Grant `feature` by hand (an organization onboarded outside Stripe). Idempotent."""
    feature = validate_feature(feature)
    if note is not None and len(note) > MAX_NOTE_LENGTH:
        raise EntitlementError(f"note must be at most {MAX_NOTE_LENGTH} characters")
    now = utcnow()
    values = {
        "organization_id": organization_id,
        "lookup_key": feature,
        "source": EntitlementSource.MANUAL.value,
        "active": True,
        "note": note,
        "created_at": now,
        "updated_at": now,
    }
    with runtime.session_factory.begin() as session:
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        # An upsert, so two operators granting at once both succeed with one row.
        statement = dialect.insert(Entitlement).values(values)
        changes = {"active": True, "updated_at": now}
        if note is not None:
            changes["note"] = note
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["organization_id", "lookup_key", "source"], set_=changes
            )
        )
        record = _manual_record(session, organization_id, feature)
    log.info(
        logs.ENTITLEMENT_GRANTED,
        extra={"organization_id": organization_id, "lookup_key": feature, "note": note},
    )
    return record


def revoke_manual(runtime: Runtime, organization_id: int, feature: str) -> RevokeResult:
    """Take back a manual grant (the row stays, inactive, as the record of when)."""
    feature = validate_feature(feature)
    with runtime.session_factory.begin() as session:
        revoked = session.execute(
            update(Entitlement)
            .where(
                Entitlement.organization_id == organization_id,
                Entitlement.lookup_key == feature,
                Entitlement.source == EntitlementSource.MANUAL.value,
                Entitlement.active.is_(True),
            )
            .values(active=False, updated_at=utcnow())
        ).rowcount
        still_entitled = has_entitlement(session, organization_id, feature)
    if not revoked:
        raise EntitlementError(
            f"organization {organization_id} has no active manual grant of {feature!r}"
        )
    log.info(
        logs.ENTITLEMENT_REVOKED,
        extra={
            "organization_id": organization_id,
            "lookup_key": feature,
            "still_entitled": still_entitled,
        },
    )
    return RevokeResult(organization_id, feature, revoked=True, still_entitled=still_entitled)


def list_entitlements(
    runtime: Runtime, organization_id: int | None = None, *, include_inactive: bool = False
) -> list[EntitlementRecord]:
    query = select(Entitlement).order_by(
        Entitlement.organization_id, Entitlement.lookup_key, Entitlement.source
    )
    if organization_id is not None:
        query = query.where(Entitlement.organization_id == organization_id)
    if not include_inactive:
        query = query.where(Entitlement.active.is_(True))
    with runtime.session_factory() as session:
        return [_record(row) for row in session.scalars(query)]


def _manual_record(session: Session, organization_id: int, feature: str) -> EntitlementRecord:
    row = session.scalars(
        select(Entitlement).where(
            Entitlement.organization_id == organization_id,
            Entitlement.lookup_key == feature,
            Entitlement.source == EntitlementSource.MANUAL.value,
        )
    ).one()
    return _record(row)


def _record(row: Entitlement) -> EntitlementRecord:
    return EntitlementRecord(
        organization_id=row.organization_id,
        feature=row.lookup_key,
        source=row.source,
        active=row.active,
        note=row.note,
        updated_at=row.updated_at,
    )
