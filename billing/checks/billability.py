"""Whether a pending billable event can be billed now, and the reason when it cannot.

One definition serves the claim (its row filter and its group ceiling), the flush result's and
the gauges' counts by reason, and `flask billing usage unbillable|dismiss`: a pending row the claim
passes over always has a reason here, and a row with a reason is never claimed. Such a row is set
aside, not dropped: it stays pending, so fixing it (or the configuration) bills it on the next
flush, and it never stops the rows around it.

No query here may raise on a hostile value, or one upstream row would stop billing for everyone:
PostgreSQL's `CAST(quantity AS BIGINT)` raises on 1e30, and PostgreSQL does not promise to
evaluate `AND` in order, so a guard beside the cast does not help: a whole number is
`mod(quantity, 1) = 0` there (SQLite's CAST saturates instead of raising). Sums are compared with
the group ceiling before anything is written into the bigint outbox `value`; on SQLite, whose
integer `sum()` raises on overflow, they are taken with `total()` (a double: exact up to 2**53,
above every ceiling, and it only rounds upwards past it, so the comparison stays right).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from billing.config import Settings
from billing.models import BillableEvent, BillingAccount, pending_event

# Stripe accepts meter event timestamps up to 35 days old; claim only what is younger than 34
# days so that a re-send inside the 23-hour window still lands inside Stripe's limit.
MAX_EVENT_AGE = timedelta(days=34)
HOUR = timedelta(hours=1)

EVENTS = BillableEvent.__table__
ACCOUNTS = BillingAccount.__table__
REQUIRED_COLUMNS = ("organization_id", "event_type", "quantity", "occurred_at")


class UnbillableReason(enum.StrEnum):
    """Why a pending row is not claimed, in the order they are given (the first that applies)."""

    MISSING_VALUE = "missing_value"  # NULL in a column the contract requires (adopted tables)
    INVALID_QUANTITY = "invalid_quantity"  # not a whole number > 0: 0, -3, 0.4, 1.5
    QUANTITY_OVER_CEILING = "quantity_over_ceiling"  # above STRIPE_USAGE_MAX_EVENT_QUANTITY
    FUTURE = "future"  # occurred_at is after now
    TOO_OLD = "too_old"  # 34 days or older: Stripe refuses it
    NO_METER = "no_meter"  # event_type not in STRIPE_BILLING_METERS
    NO_CUSTOMER = "no_customer"  # no billing account with a Stripe customer
    # The billable rows of its (organization, event type, hour) sum above
    # STRIPE_USAGE_MAX_GROUP_QUANTITY: the whole group is set aside.
    GROUP_OVER_CEILING = "group_over_ceiling"


REASONS: tuple[str, ...] = tuple(reason.value for reason in UnbillableReason)
ROW_REASONS = REASONS[:-1]  # all but the group's, which is last


def whole_number(quantity: Any, dialect: str) -> sa.ColumnElement[bool]:
    if dialect == "postgresql":
        return sa.func.mod(quantity, 1) == 0
    return quantity == sa.cast(quantity, sa.Integer)


def hour_bucket(column: Any, dialect: str) -> Any:
    if dialect == "postgresql":
        return sa.func.date_trunc("hour", column, "UTC")
    return sa.func.strftime("%Y-%m-%d %H:00:00", column)


def exact_sum(quantity: Any, dialect: str) -> Any:
    """A sum that never raises (see the module's docstring)."""
    return sa.func.sum(quantity) if dialect == "postgresql" else sa.func.total(quantity)


@dataclass(frozen=True)
class BillableRules:
    """What makes a pending row billable at `now`. The claim passes only the event types no stop
    covers as `meters`; every count and listing passes every mapped type."""

    now: datetime
    meters: tuple[str, ...]
    max_event_quantity: int
    max_group_quantity: int
    dialect: str

    @classmethod
    def of(
        cls,
        settings: Settings,
        now: datetime,
        dialect: str,
        meters: Iterable[str] | None = None,
    ) -> BillableRules:
        return cls(
            now=now,
            meters=tuple(sorted(settings.stripe_meters if meters is None else meters)),
            max_event_quantity=settings.max_event_quantity,
            max_group_quantity=settings.max_group_quantity,
            dialect=dialect,
        )

    def row_rules(
        self, events: Any = EVENTS
    ) -> list[tuple[UnbillableReason, sa.ColumnElement[bool]]]:
        """(reason, the condition a billable row meets) for the rules about the row alone."""
        c = events.c
        return [
            (
                UnbillableReason.MISSING_VALUE,
                sa.and_(*(c[name].is_not(None) for name in REQUIRED_COLUMNS)),
            ),
            (UnbillableReason.INVALID_QUANTITY, c.quantity > 0),
            (UnbillableReason.QUANTITY_OVER_CEILING, c.quantity <= self.max_event_quantity),
            (UnbillableReason.INVALID_QUANTITY, whole_number(c.quantity, self.dialect)),
            (UnbillableReason.FUTURE, c.occurred_at <= self.now),
            (UnbillableReason.TOO_OLD, c.occurred_at > self.now - MAX_EVENT_AGE),
            (UnbillableReason.NO_METER, c.event_type.in_(self.meters)),
        ]

    def row_filter(self, events: Any = EVENTS) -> list[sa.ColumnElement[bool]]:
        return [condition for _, condition in self.row_rules(events)]

    def row_reason(self, events: Any = EVENTS, accounts: Any = ACCOUNTS) -> Any:
        """The first rule a row (outer-joined to its account) breaks; NULL when it breaks none."""
        whens = [(sa.not_(condition), reason.value) for reason, condition in self.row_rules(events)]
        whens.append((accounts.c.stripe_customer_id.is_(None), UnbillableReason.NO_CUSTOMER.value))
        return sa.case(*whens, else_=sa.null())

    def over_group_ceiling(self, total: Any) -> sa.ColumnElement[bool]:
        return total > self.max_group_quantity

    def group_total(
        self, organization_id: Any, event_type: Any, start: Any, end: Any
    ) -> sa.ScalarSelect[Any]:
        """The sum of the billable pending rows of one (organization, event type, hour)."""
        events = EVENTS.alias("group_events")
        c = events.c
        return (
            sa.select(exact_sum(c.quantity, self.dialect))
            .where(
                pending_event(events),
                *self.row_filter(events),
                c.organization_id == organization_id,
                c.event_type == event_type,
                c.occurred_at >= start,
                c.occurred_at < end,
            )
            .scalar_subquery()
        )


def _classified(rules: BillableRules, organization_ids: Sequence[int] | None) -> sa.Select[Any]:
    """Every pending row (of these organizations, or all) with its hour and the first rule about
    the row alone that it breaks (`row_reason`, NULL when none)."""
    events, accounts = EVENTS, ACCOUNTS
    scope = [pending_event(events)]
    if organization_ids is not None:
        scope.append(events.c.organization_id.in_(organization_ids))
    return (
        sa.select(
            events.c.id,
            events.c.organization_id,
            events.c.event_type,
            events.c.quantity,
            events.c.occurred_at,
            hour_bucket(events.c.occurred_at, rules.dialect).label("hour"),
            rules.row_reason(events, accounts).label("row_reason"),
        )
        .select_from(
            events.outerjoin(accounts, accounts.c.organization_id == events.c.organization_id)
        )
        .where(*scope)
    )


def _groups(rules: BillableRules, rows: Any) -> sa.Subquery:
    """Per (organization, event type, hour): how many rows break each rule about the row alone,
    and how many are billable and their sum (a group's billable rows above the ceiling are set
    aside). Grouped by these three only, so PostgreSQL hashes a few groups in one pass over the
    backlog instead of sorting it."""
    billable = rows.c.row_reason.is_(None)
    return (
        sa.select(
            rows.c.organization_id,
            rows.c.event_type,
            rows.c.hour,
            *(sa.func.count().filter(rows.c.row_reason == r).label(r) for r in ROW_REASONS),
            sa.func.count().filter(billable).label("billable_rows"),
            exact_sum(rows.c.quantity, rules.dialect).filter(billable).label("billable_total"),
        )
        .group_by(rows.c.organization_id, rows.c.event_type, rows.c.hour)
        .subquery("groups")
    )


def unbillable_events(
    rules: BillableRules, organization_ids: Sequence[int] | None = None
) -> sa.Subquery:
    """Every pending row the flush sets aside now (of these organizations, or all), with its
    reason: (id, organization_id, event_type, quantity, occurred_at, reason).

    A group's sum is taken over all its billable pending rows, so callers narrow the result to
    some rows (ids, a reason) outside, never inside; organizations are whole groups."""
    rows = _classified(rules, organization_ids).cte("classified")
    groups = _groups(rules, rows)
    over = (
        sa.select(groups.c.organization_id, groups.c.event_type, groups.c.hour)
        .where(rules.over_group_ceiling(groups.c.billable_total))
        .subquery("over_group_ceiling")
    )
    in_over = sa.and_(*(rows.c[k] == over.c[k] for k in ("organization_id", "event_type", "hour")))
    reason = sa.func.coalesce(
        rows.c.row_reason,
        sa.case(
            (over.c.hour.is_not(None), UnbillableReason.GROUP_OVER_CEILING.value),
            else_=sa.null(),
        ),
    )
    return (
        sa.select(*rows.c[:5], reason.label("reason"))
        .select_from(rows.outerjoin(over, in_over))
        .where(reason.is_not(None))
        .subquery("unbillable")
    )


def count_unbillable(
    connection: sa.Connection | Any, rules: BillableRules, organization_id: int | None = None
) -> dict[str, int]:
    """Pending rows set aside now, by reason (only the reasons that have some). Counted per
    group in one pass, never row by row: it runs at every scrape, over the whole backlog."""
    scope = None if organization_id is None else [organization_id]
    # OFFSET 0 keeps PostgreSQL from inlining the rows: inlined, it evaluated the reason's CASE
    # once per FILTER, nine times a row, and this runs at every scrape over the whole backlog.
    rows = _classified(rules, scope).offset(0).subquery("classified")
    groups = _groups(rules, rows)
    over = sa.case(
        (rules.over_group_ceiling(groups.c.billable_total), groups.c.billable_rows), else_=0
    )
    query = sa.select(*(sa.func.sum(groups.c[r]) for r in ROW_REASONS), sa.func.sum(over))
    found = zip(REASONS, connection.execute(query).one(), strict=True)
    return {reason: int(n) for reason, n in found if n}
