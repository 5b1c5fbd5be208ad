"""Reconciliation: what the outbox says was sent against what Stripe aggregated, per customer,
meter and hour, and settlement of rows held past Stripe's identifier window.

For each (customer, meter) in the window one summaries call (`value_grouping_window=hour`, every
page) gives Stripe's hourly totals; the outbox's `sent` rows give ours (a row's meter event is
stamped at its `window_start`, so it lands in that hour). A group is:
- `match`: the totals agree and no row of the group is still pending or held;
- `drift`: they differ and nothing is in flight: the rows behind it are listed (exit 1). When
  Stripe holds less and exactly one set of the group's sent rows makes up the gap (Stripe holds
  none of the hour: all of them), those rows are marked `rejected` (`usage.rejections`, code
  `reconcile_missing`): Stripe never counted them, and an operator re-queues them with a new
  identifier once the cause is fixed. Any other drift is reported only, never marked: a re-send
  of a row Stripe did count would bill it twice;
- `in_flight`: pending or held rows make the difference expected until they settle;
- `unknown`: Stripe could not answer (an error, a meter it does not know): nothing is concluded
  from it (exit 1: not proven);
- `not_settled`: Stripe aggregates asynchronously and its summaries lag by an amount it does not
  publish, so a group is judged only `STRIPE_BILLING_RECONCILE_SETTLE_SECONDS` after its hour
  ended *and* after its last row was sent (a late row for an old hour makes that hour young
  again); before, whatever the totals say, it is not settled, never drift (the default window
  stops before the hours that cannot be settled yet).
A group with rows held for longer than the identifier window (24 h) is settled only on a clear
answer, with no row of it pending: Stripe = sent + held → the held rows were delivered, marked
`sent`; Stripe = sent → provably absent, re-issued with a new identifier (pending; the next flush
sends it). Any other total is left for a person. Both are recorded in the outbox's audit trail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import combinations
from typing import Any, TypeVar

import sqlalchemy as sa

from billing import logs, ops_records
from billing.logs import get_logger
from billing.models import SubmissionStatus, UsageSubmission, utcnow
from billing.runtime import Runtime
from billing.stripe_gateway import StripeGatewayError
from billing.usage import outbox, rejections

log = get_logger("billing.reconcile")

HOUR = timedelta(hours=1)
# Stripe keeps a meter event identifier for at least 24 hours; past it a re-send is not deduped.
IDENTIFIER_WINDOW = timedelta(hours=24)
DEFAULT_LOOKBACK = timedelta(hours=48)
ACTOR = "reconcile"
# The code a row gets when reconciliation finds it missing from Stripe (no error report named it).
MISSING_CODE = "reconcile_missing"
# Exactly one set of rows making up a gap is proven by trying every set: 2**12 = 4,096 at most.
MAX_ATTRIBUTED_ROWS = 12
STATUSES = ("match", "drift", "in_flight", "unknown", "not_settled")

SENT = SubmissionStatus.SENT.value
PENDING = SubmissionStatus.PENDING.value
HELD = SubmissionStatus.HELD.value

T = TypeVar("T")
Key = tuple[str, str, datetime]  # (customer, meter event name, hour)


@dataclass
class Group:
    customer: str
    meter: str
    hour: datetime
    rows: list[dict[str, Any]] = field(default_factory=list)
    stripe: int | None = None
    status: str = "unknown"
    detail: str | None = None
    settled: str | None = None  # "delivered" or "reissued"
    rejected: list[int] = field(default_factory=list)  # rows this run marked rejected

    def total(self, *statuses: str) -> int:
        return sum(r["value"] for r in self.rows if r["status"] in statuses)

    def has(self, status: str) -> bool:
        return any(r["status"] == status for r in self.rows)

    def log_fields(self) -> dict[str, Any]:
        organizations = sorted({r["organization_id"] for r in self.rows})
        return {
            "organization_id": organizations[0] if len(organizations) == 1 else None,
            "stripe_customer_id": self.customer,
            "meter": self.meter,
            "hour": self.hour.isoformat(),
            "stripe_total": self.stripe,
            "sent_total": self.total(SENT),
            "detail": self.detail,
            "rejected": self.rejected,
        }

    def settles_at(self, settle: timedelta) -> datetime:
        """When Stripe's summary of this group can be trusted: `settle` after the later of the
        hour's end and the last time one of its rows reached Stripe."""
        reached = [
            datetime.fromisoformat(r["reached_stripe_at"])
            for r in self.rows
            if r["reached_stripe_at"]
        ]
        return max([self.hour + HOUR, *reached]) + settle

    def to_dict(self) -> dict[str, Any]:
        return {
            "stripe_customer_id": self.customer,
            "meter": self.meter,
            "hour": self.hour.isoformat(),
            "stripe_total": self.stripe,
            "sent_total": self.total(SENT),
            "status": self.status,
            "detail": self.detail,
            "settled": self.settled,
            "rejected": self.rejected,
            "rows": self.rows,
        }


@dataclass
class ReconcileReport:
    since: datetime
    until: datetime
    groups: list[Group]

    def count(self, status: str) -> int:
        return sum(1 for g in self.groups if g.status == status)

    @property
    def ok(self) -> bool:
        return not (self.count("drift") or self.count("unknown"))

    def counts(self) -> dict[str, int]:
        return {status: self.count(status) for status in STATUSES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "groups": self.counts(),
            "settled": {
                kind: sum(1 for g in self.groups if g.settled == kind)
                for kind in ("delivered", "reissued")
            },
            "ok": self.ok,
            "rejected_rows": sum(len(g.rejected) for g in self.groups),
            # Matching groups are counted, not listed: the report is about what needs a look.
            "problems": [g.to_dict() for g in self.groups if g.status != "match" or g.settled],
        }


def settle_delay(runtime: Runtime) -> timedelta:
    return timedelta(seconds=runtime.settings.reconcile_settle_seconds)


def default_window(runtime: Runtime, now: datetime) -> tuple[datetime, datetime]:
    """The last 48 hours that ended a settle lag ago, reaching back to the oldest held row so
    none is left out."""
    until = floor_hour(now - settle_delay(runtime))
    with runtime.session_factory() as session:
        oldest_held = session.scalar(
            sa.select(sa.func.min(UsageSubmission.window_start)).where(
                UsageSubmission.status == HELD
            )
        )
    since = until - DEFAULT_LOOKBACK
    if oldest_held is not None:
        since = min(since, floor_hour(oldest_held))
    return since, until


def reconcile(
    runtime: Runtime,
    since: datetime,
    until: datetime,
    *,
    now: datetime | None = None,
    progress: Callable[[Iterable[tuple[str, str]]], Iterable[tuple[str, str]]] = lambda x: x,
) -> ReconcileReport:
    now = now or utcnow()
    settle = settle_delay(runtime)
    since, until = floor_hour(since), floor_hour(until)
    groups = _outbox_groups(runtime, since, until)
    pairs = sorted({(g.customer, g.meter) for g in groups.values()})
    meters = runtime.stripe.meter_by_event_name()
    for customer, meter in progress(pairs):
        _compare(runtime, meters.get(meter), customer, meter, since, until, now, settle, groups)
    report = ReconcileReport(since, until, sorted(groups.values(), key=_order))
    for group in report.groups:
        drift = group.status == "drift"  # before held rows are settled
        if group.status == "in_flight":
            _settle_held(runtime, group, now)
        if group.status == "drift":
            # The totals as found; the rows it marks then log one line each.
            log.warning(logs.RECONCILE_DRIFT, extra=group.log_fields())
        if drift:
            _reject_missing(runtime, group)
    return report


def reconcile_scheduled(
    runtime: Runtime,
    *,
    source: str,
    now: datetime | None = None,
    progress: Callable[[Iterable[tuple[str, str]]], Iterable[tuple[str, str]]] = lambda x: x,
) -> ReconcileReport:
    """The default window, logged and recorded (`ops_records.RECONCILE`, which `status` and the
    gauges read): what beat's hourly task runs, and the CLI without a window (cron)."""
    now = now or utcnow()
    since, until = default_window(runtime, now)
    log.info(
        logs.RECONCILE_STARTED,
        extra={"since": since.isoformat(), "until": until.isoformat(), "source": source},
    )
    report = reconcile(runtime, since, until, now=now, progress=progress)
    fields = {
        "source": source,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "ok": report.ok,
    }
    entry = {"at": utcnow().isoformat(), **fields, "groups": report.counts()}
    ops_records.update_record(runtime.session_factory, ops_records.RECONCILE, lambda _: entry)
    level = logging.INFO if report.ok else logging.WARNING
    log.log(level, logs.RECONCILE_COMPLETED, extra={**fields, **report.counts()})
    return report


def _outbox_groups(runtime: Runtime, since: datetime, until: datetime) -> dict[Key, Group]:
    columns = (
        UsageSubmission.id,
        UsageSubmission.status,
        UsageSubmission.stripe_customer_id,
        UsageSubmission.event_name,
        UsageSubmission.organization_id,
        UsageSubmission.value,
        UsageSubmission.identifier,
        UsageSubmission.window_start,
        UsageSubmission.created_at,
        UsageSubmission.updated_at,
        UsageSubmission.sent_at,
    )
    query = (
        sa.select(*columns)
        .where(UsageSubmission.window_start >= since, UsageSubmission.window_start < until)
        .order_by(UsageSubmission.id)
    )
    groups: dict[Key, Group] = {}
    with runtime.session_factory() as session:
        for row in session.execute(query):
            key = (row.stripe_customer_id, row.event_name, floor_hour(row.window_start))
            group = groups.setdefault(key, Group(*key))
            group.rows.append(
                {
                    "id": row.id,
                    "status": row.status,
                    "organization_id": row.organization_id,
                    "value": int(row.value),
                    "identifier": row.identifier,
                    "window_start": row.window_start.isoformat(),
                    "identifier_since": row.created_at.isoformat(),
                    "sent_at": _iso(row.sent_at),
                    # When Stripe last heard of the row: a held row's attempts ended before it
                    # was held (its last update); other statuses are not in Stripe's total.
                    "reached_stripe_at": _iso(
                        row.sent_at
                        if row.status == SENT
                        else row.updated_at
                        if row.status == HELD
                        else None
                    ),
                }
            )
    return groups


def _compare(
    runtime: Runtime,
    meter: Any,
    customer: str,
    meter_name: str,
    since: datetime,
    until: datetime,
    now: datetime,
    settle: timedelta,
    groups: dict[Key, Group],
) -> None:
    mine = {k: g for k, g in groups.items() if k[0] == customer and k[1] == meter_name}
    if meter is None:
        _mark_unknown(mine.values(), f"Stripe has no meter with event name {meter_name!r}")
        return
    try:
        totals = runtime.stripe.meter_hourly_totals(meter.id, customer, since, until)
    except StripeGatewayError as error:
        _mark_unknown(mine.values(), f"Stripe's summaries could not be read: {error}")
        return
    for hour in totals:  # usage in Stripe that the outbox never sent
        key = (customer, meter_name, hour)
        if key not in groups:
            groups[key] = mine[key] = Group(*key)
    for group in mine.values():
        settles_at = group.settles_at(settle)
        if settles_at > now:
            group.status = "not_settled"
            group.detail = (
                f"Stripe's summary may still be catching up until {settles_at.isoformat()} "
                f"(settle lag {settle.total_seconds():.0f} s)"
            )
            continue
        group.stripe = totals.get(group.hour, 0)
        if group.has(PENDING) or group.has(HELD):
            group.status = "in_flight"
        elif group.stripe == group.total(SENT):
            group.status = "match"
        else:
            group.status = "drift"
            group.detail = f"Stripe {group.stripe} vs outbox sent {group.total(SENT)}"


def _reject_missing(runtime: Runtime, group: Group) -> None:
    """Mark rejected the sent rows Stripe provably does not hold; leave any other drift alone."""
    assert group.stripe is not None
    sent = [r for r in group.rows if r["status"] == SENT]
    gap = group.total(SENT) - group.stripe
    if gap <= 0:
        group.detail = f"{group.detail}; Stripe holds more than was sent: nothing to mark"
        return
    missing = missing_rows(sent, gap, lambda r: r["value"])
    if missing is None:
        group.detail = (
            f"{group.detail}; no single set of rows makes up the gap of {gap}: nothing marked "
            "(re-sending a row Stripe did count would bill it twice)"
        )
        return
    message = (
        f"not in Stripe's settled summary of {group.hour:%Y-%m-%d %H:00} UTC (Stripe "
        f"{group.stripe}, outbox sent {group.total(SENT)}): found by reconciliation"
    )
    group.rejected = rejections.mark_rejected(
        runtime, {r["id"]: (MISSING_CODE, message) for r in missing}, ACTOR
    )
    for row in missing:
        if row["id"] in group.rejected:
            row["status"] = rejections.REJECTED
    group.detail = f"{group.detail}; rows {group.rejected} are missing from Stripe: marked rejected"


def missing_rows(rows: Sequence[T], gap: int, value: Callable[[T], int]) -> list[T] | None:
    """The rows whose values add up to `gap`, when exactly one set of them does; else None.

    All positive and all of them missing (Stripe holds none of the hour) is proven at once; any
    other answer only by trying every set, so at most `MAX_ATTRIBUTED_ROWS` rows."""
    if gap <= 0:  # Stripe holds as much or more: no row is missing
        return None
    if gap == sum(value(r) for r in rows) and all(value(r) > 0 for r in rows):
        return list(rows)
    if len(rows) > MAX_ATTRIBUTED_ROWS:
        return None
    found: list[T] | None = None
    for size in range(1, len(rows) + 1):
        for subset in combinations(rows, size):
            if sum(value(r) for r in subset) == gap:
                if found is not None:
                    return None
                found = list(subset)
    return found


def _settle_held(runtime: Runtime, group: Group, now: datetime) -> None:
    expired = [
        r
        for r in group.rows
        if r["status"] == HELD
        and datetime.fromisoformat(r["identifier_since"]) + IDENTIFIER_WINDOW <= now
    ]
    if not expired:
        group.detail = "pending or held rows still inside Stripe's identifier window"
        return
    if group.has(PENDING) or len(expired) != sum(1 for r in group.rows if r["status"] == HELD):
        group.detail = "held rows wait: other rows of this hour are still in flight"
        return
    sent, held = group.total(SENT), sum(r["value"] for r in expired)
    ids = [r["id"] for r in expired]
    assert group.stripe is not None
    if group.stripe == sent + held:
        outbox.mark_held_delivered(
            runtime,
            ids,
            actor=ACTOR,
            reason=f"Stripe's hourly summary {group.stripe} = sent {sent} + held {held}",
        )
        group.settled, group.status = "delivered", "match"
    elif group.stripe == sent:
        outbox.retry_submissions(runtime, ids, actor=ACTOR, reissue_held=True)
        group.settled = "reissued"
        group.detail = "absent from Stripe: re-issued with a new identifier for the next flush"
    else:
        group.status = "drift"
        group.detail = (
            f"Stripe {group.stripe} is neither sent {sent} nor sent + held {sent + held}: "
            "not settled, look at the rows"
        )
        return
    for row in expired:
        row["status"] = SENT if group.settled == "delivered" else PENDING
    log.warning(
        logs.RECONCILE_HELD_SETTLED,
        extra={
            "submission_ids": ids,
            "settled": group.settled,
            "stripe_customer_id": group.customer,
            "meter": group.meter,
            "hour": group.hour.isoformat(),
        },
    )


def _mark_unknown(groups: Iterable[Group], detail: str) -> None:
    for group in groups:
        group.status, group.detail = "unknown", detail


def _order(group: Group) -> tuple[str, str, datetime]:
    return (group.customer, group.meter, group.hour)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def floor_hour(value: datetime) -> datetime:
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.replace(minute=0, second=0, microsecond=0)
