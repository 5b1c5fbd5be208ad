"""Claiming: unclaimed billable events become outbox rows, one transaction per batch.

A batch reads the next unclaimed rows in group order (organization, event type, time, id), sums
them per (organization, event type, hour) in SQL, writes one outbox row (`usage_submissions`) per
group with a fixed Stripe `identifier`, and points the rows at it. All of that commits, or none of
it does. Two claimers never bill a row twice: the link re-checks that each row is still unclaimed,
and a batch that finds fewer rows to link than it summed is rolled back and picked again
(`ClaimConflict`).

The cost of a batch must not grow with how far the run has got: a keyset cursor bounds the scan
of `ix_billable_events_unclaimed_by_group` so it starts where the previous batch ended and never
walks the entries of rows already claimed (they stay in the partial index as dead entries until
VACUUM). On PostgreSQL the whole batch is one statement (`_claim_set_based`): the index scan is
the driving scan, the account join comes after the LIMIT, so no nested loop over
`billing_accounts` re-probes every organization before the cursor (which made a 1M-event flush
quadratic), and rows are written in id order, not group order (see there). SQLite, the embedded
default, keeps the portable path (`_claim_portable`): correct, not fast.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from billing.config import Settings
from billing.models import BillableEvent, BillingAccount, SubmissionStatus, UsageSubmission

if TYPE_CHECKING:
    from billing.submitting import Stops

# Stripe accepts meter event timestamps up to 35 days old; claim only what is younger than 34
# days so that a re-send inside the 23-hour window still lands inside Stripe's limit.
MAX_EVENT_AGE = timedelta(days=34)
HOUR = timedelta(hours=1)


def whole_positive_quantity(quantity: Any) -> sa.ColumnElement[bool]:
    """A quantity that is a meter event value: a whole number > 0. A `numeric` column may hold
    0.4 or 1.5; summing and truncating those would bill usage that never happened."""
    return sa.and_(quantity > 0, quantity == sa.cast(quantity, sa.BigInteger))


class UnbillableReason:
    INVALID_QUANTITY = "invalid_quantity"
    FUTURE = "future"
    TOO_OLD = "too_old"
    NO_METER = "no_meter"
    NO_CUSTOMER = "no_customer"


# Group order keeps each (organization, type, hour) whole inside one batch, except at a batch's
# edges, so a batch yields few meter events.
GROUP_ORDER = (
    BillableEvent.organization_id,
    BillableEvent.event_type,
    BillableEvent.occurred_at,
    BillableEvent.id,
)


class ClaimConflict(RuntimeError):
    """Rows of a batch were claimed by another flush between reading and linking them; the
    batch was rolled back (nothing written) and is picked again."""


@dataclass(frozen=True)
class ClaimedBatch:
    picked: int  # rows the batch looked at (the cursor moved past them)
    events: int  # of those, claimed into outbox rows
    submission_ids: list[int]


class Claimer:
    """Claims batches for one flush run, continuing after the previous batch (keyset cursor).

    The first batch is `STRIPE_USAGE_FLUSH_BATCH_SIZE` rows, so sending starts early; each next
    one doubles, up to `GROWTH_LIMIT` times the setting and `MAX_BATCH_ROWS`. Few batches matter
    at scale: a batch's edge cuts a group (one more Stripe call), and each batch writes rows
    spread over the whole table (the pages of a backlog that does not fit PostgreSQL's buffers
    are read and written again by every batch). The portable path (SQLite) holds a batch's ids in
    memory: its batches stop at `MAX_PORTABLE_BATCH_ROWS`.
    """

    GROWTH_LIMIT = 200
    CONFLICT_ATTEMPTS = 5
    MAX_BATCH_ROWS = 1_000_000
    MAX_PORTABLE_BATCH_ROWS = 100_000

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        stops: Stops,
        *,
        organization_id: int | None,
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.stops = stops
        self.organization_id = organization_id
        self.clock = clock
        self._cursor: tuple[Any, ...] | None = None  # group-order key of the last picked row
        self.batch_size = settings.flush_batch_size

    def claimable_event_types(self) -> list[str]:
        """Mapped event types whose meter no error has stopped in this run."""
        stopped = self.stops.stopped_meters()
        return sorted(t for t, name in self.settings.stripe_meters.items() if name not in stopped)

    def _event_filter(self, now: datetime) -> list[sa.ColumnElement[bool]]:
        event = BillableEvent
        conditions = [
            event.usage_submission_id.is_(None),
            whole_positive_quantity(event.quantity),
            event.occurred_at <= now,
            event.occurred_at > now - MAX_EVENT_AGE,
            event.event_type.in_(self.claimable_event_types()),
        ]
        if self.organization_id is not None:
            conditions.append(event.organization_id == self.organization_id)
        if self._cursor is not None:
            # Continue after the previous batch; bound with the columns' own types, so timestamps
            # compare as stored.
            after = sa.tuple_(
                *(
                    sa.bindparam(None, v, type_=c.type)
                    for c, v in zip(GROUP_ORDER, self._cursor, strict=True)
                )
            )
            conditions.append(sa.tuple_(*GROUP_ORDER) > after)
        return conditions

    def _account_filter(self) -> list[sa.ColumnElement[bool]]:
        conditions = [BillingAccount.stripe_customer_id.is_not(None)]
        stopped = self.stops.stopped_customers()
        if stopped:
            # Left unclaimed (not parked in the outbox) until the customer is fixed.
            conditions.append(BillingAccount.stripe_customer_id.not_in(stopped))
        return conditions

    def claim_batch(self) -> ClaimedBatch | None:
        """Claim up to one batch of events into outbox rows, in one transaction; None when no
        unclaimed row is left after the cursor."""
        if not self.claimable_event_types():
            return None
        now = self.clock()
        token = uuid.uuid4().hex[:12]
        for attempt in range(1, self.CONFLICT_ATTEMPTS + 1):
            try:
                with self.sessions.begin() as session:
                    dialect = session.get_bind().dialect.name
                    if dialect == "postgresql":
                        batch = self._claim_set_based(session, now, token)
                    else:
                        batch = self._claim_portable(session, now, token)
                break
            except ClaimConflict:
                if attempt == self.CONFLICT_ATTEMPTS:
                    raise
        if batch is not None:
            self._grow(set_based=dialect == "postgresql")
        return batch

    def _grow(self, *, set_based: bool) -> None:
        setting = self.settings.flush_batch_size
        largest = self.MAX_BATCH_ROWS if set_based else self.MAX_PORTABLE_BATCH_ROWS
        ceiling = max(setting, min(setting * self.GROWTH_LIMIT, largest))
        self.batch_size = min(self.batch_size * 2, ceiling)

    # PostgreSQL: one statement per batch -------------------------------------------------------

    def _claim_set_based(self, session: Session, now: datetime, token: str) -> ClaimedBatch | None:
        event, account, submission = BillableEvent, BillingAccount, UsageSubmission
        # Read in group order; no row lock: the link below writes each row once, in id order.
        # Locking (FOR UPDATE) or linking in group order visits pages at random, and a backlog
        # larger than PostgreSQL's buffers had each page read and written again and again
        # (measured: 23M page writes by backends for a 5M-event flush). A concurrent claimer of
        # the same rows is caught by the link's re-check instead (`ClaimConflict`).
        picked = (
            sa.select(*GROUP_ORDER, event.quantity)
            .where(*self._event_filter(now))
            .order_by(*GROUP_ORDER)
            .limit(self.batch_size)
            .cte("picked")
        )
        hour = sa.func.date_trunc("hour", picked.c.occurred_at, "UTC")
        # The period boundary inside this hour, if any: the hour is split at it.
        boundary = sa.case(
            *(
                (sa.and_(edge > hour, edge < hour + HOUR), edge)
                for edge in (account.current_period_start, account.current_period_end)
            ),
            else_=sa.null(),
        )
        after = sa.and_(boundary.is_not(None), picked.c.occurred_at >= boundary)
        before = sa.and_(boundary.is_not(None), picked.c.occurred_at < boundary)
        windowed = (
            sa.select(
                picked.c.id,
                picked.c.organization_id,
                picked.c.event_type,
                picked.c.quantity,
                account.stripe_customer_id,
                sa.case((after, boundary), else_=hour).label("window_start"),
                sa.case((before, boundary), else_=hour + HOUR).label("window_end"),
            )
            .join(
                account,
                sa.and_(
                    account.organization_id == picked.c.organization_id, *self._account_filter()
                ),
            )
            .cte("windowed")
        )
        meters = sa.values(
            sa.column("event_type", sa.String),
            sa.column("event_name", sa.String),
            sa.column("type_part", sa.String),
            name="meters",
        ).data(
            [
                (
                    event_type,
                    self.settings.stripe_meters[event_type],
                    identifier_type_part(event_type),
                )
                for event_type in self.claimable_event_types()
            ]
        )
        w = windowed.c
        # The same identifier as `usage_identifier`, built in SQL.
        identifier = sa.func.left(
            sa.func.concat(
                w.organization_id,
                "-",
                meters.c.type_part,
                "-",
                sa.func.to_char(sa.func.timezone("UTC", w.window_start), "YYYYMMDDHH24MI"),
                "-",
                token,
            ),
            100,
        )
        keys = (w.organization_id, w.stripe_customer_id, w.event_type, meters.c.event_name)
        grouped = (
            sa.select(
                *keys,
                sa.func.sum(w.quantity),
                sa.func.count(),
                w.window_start,
                w.window_end,
                identifier,
                sa.literal(SubmissionStatus.PENDING.value),
                sa.literal(0),
                sa.literal(now, UsageSubmission.created_at.type),
                sa.literal(now, UsageSubmission.updated_at.type),
            )
            .join(meters, meters.c.event_type == w.event_type)
            .group_by(*keys, meters.c.type_part, w.window_start, w.window_end)
        )
        outbox = (
            sa.insert(submission)
            .from_select(
                [
                    "organization_id",
                    "stripe_customer_id",
                    "event_type",
                    "event_name",
                    "value",
                    "event_count",
                    "window_start",
                    "window_end",
                    "identifier",
                    "status",
                    "attempts",
                    "created_at",
                    "updated_at",
                ],
                grouped,
            )
            .returning(
                submission.id,
                submission.organization_id,
                submission.event_type,
                submission.window_start,
                submission.window_end,
                submission.event_count,
            )
            .cte("outbox")
        )
        # The picked ids as one array: the link is an index scan of the primary key in id order
        # (PostgreSQL sorts the array), each row matched to its group's outbox row by window.
        picked_ids = sa.cast(
            sa.select(sa.func.array_agg(picked.c.id)).scalar_subquery(), sa.ARRAY(sa.BigInteger)
        )
        linked = (
            sa.update(event)
            .values(usage_submission_id=outbox.c.id, claimed_at=now)
            .where(
                event.id == sa.any_(picked_ids),
                event.usage_submission_id.is_(None),  # re-checked on the latest row version
                outbox.c.organization_id == event.organization_id,
                outbox.c.event_type == event.event_type,
                event.occurred_at >= outbox.c.window_start,
                event.occurred_at < outbox.c.window_end,
            )
            .returning(event.id)
            .cte("linked")
        )
        last = sa.select(*picked.c[:4]).order_by(*(c.desc() for c in picked.c[:4])).limit(1)
        last = last.subquery("last")
        statement = sa.select(
            *last.c,
            sa.select(sa.func.count()).select_from(picked).scalar_subquery().label("picked"),
            sa.select(sa.func.count()).select_from(linked).scalar_subquery().label("linked"),
            sa.select(sa.func.coalesce(sa.func.sum(outbox.c.event_count), 0))
            .scalar_subquery()
            .label("grouped"),
            sa.select(sa.func.array_agg(outbox.c.id)).scalar_subquery().label("submission_ids"),
        )
        row = session.execute(statement).one_or_none()
        if row is None:
            return None
        if row.linked != row.grouped:
            # Another claimer linked some of these rows after they were read: this batch's
            # outbox rows would count them twice. Roll it back and pick again.
            raise ClaimConflict(f"grouped {row.grouped} billable events but linked {row.linked}")
        self._cursor = tuple(row[:4])
        return ClaimedBatch(
            picked=row.picked, events=row.linked, submission_ids=sorted(row.submission_ids or [])
        )

    # Portable (SQLite): pick, group, insert, link -----------------------------------------------

    def _claim_portable(self, session: Session, now: datetime, token: str) -> ClaimedBatch | None:
        event = BillableEvent
        dialect = session.get_bind().dialect.name
        if dialect == "sqlite":
            # SQLite has no row locks: take the write lock up front so two claimers serialise.
            session.execute(sa.text("UPDATE billable_events SET id = id WHERE 0"))
        pick = (
            sa.select(*GROUP_ORDER)
            .join(BillingAccount, BillingAccount.organization_id == event.organization_id)
            .where(*self._event_filter(now), *self._account_filter())
            .order_by(*GROUP_ORDER)
            .limit(self.batch_size)
        )
        picked = session.execute(pick).all()
        if not picked:
            return None
        self._cursor = tuple(picked[-1])
        ids = [row.id for row in picked]
        groups = session.execute(_group_query(ids, dialect)).all()
        rows = [self._outbox_row(group, token, now) for group in groups]
        submission_ids = list(
            session.scalars(sa.insert(UsageSubmission).returning(UsageSubmission.id), rows)
        )
        submission = UsageSubmission
        linked = session.execute(
            sa.update(event)
            .where(
                _id_in(event.id, ids, dialect),
                event.usage_submission_id.is_(None),
                _id_in(submission.id, submission_ids, dialect),
                submission.organization_id == event.organization_id,
                submission.event_type == event.event_type,
                event.occurred_at >= submission.window_start,
                event.occurred_at < submission.window_end,
            )
            .values(usage_submission_id=submission.id, claimed_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
        if linked != len(ids):
            raise RuntimeError(f"claimed {len(ids)} billable events but linked {linked}")
        return ClaimedBatch(picked=len(ids), events=len(ids), submission_ids=submission_ids)

    def _outbox_row(self, group: Any, token: str, now: datetime) -> dict[str, Any]:
        hour = _as_utc(group.hour)
        window_start, window_end = billing_window(
            hour, group.after_boundary, group.period_start, group.period_end
        )
        return {
            "organization_id": group.organization_id,
            "stripe_customer_id": group.stripe_customer_id,
            "event_type": group.event_type,
            "event_name": self.settings.stripe_meters[group.event_type],
            "value": int(group.value),
            "event_count": int(group.event_count),
            "window_start": window_start,
            "window_end": window_end,
            "identifier": usage_identifier(
                group.organization_id, group.event_type, window_start, token
            ),
            "status": SubmissionStatus.PENDING.value,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }

    # Reporting --------------------------------------------------------------------------------

    def count_unbillable(self) -> dict[str, int]:
        """Unclaimed rows that this flush could not bill, by reason. Nothing is dropped."""
        now = self.clock()
        event = BillableEvent
        meters = sorted(self.settings.stripe_meters)
        reason = sa.case(
            (sa.not_(whole_positive_quantity(event.quantity)), UnbillableReason.INVALID_QUANTITY),
            (event.occurred_at > now, UnbillableReason.FUTURE),
            (event.occurred_at <= now - MAX_EVENT_AGE, UnbillableReason.TOO_OLD),
            (event.event_type.not_in(meters) if meters else sa.true(), UnbillableReason.NO_METER),
            (BillingAccount.stripe_customer_id.is_(None), UnbillableReason.NO_CUSTOMER),
            else_=sa.null(),
        )
        query = (
            sa.select(reason.label("reason"), sa.func.count())
            .select_from(event)
            .outerjoin(BillingAccount, BillingAccount.organization_id == event.organization_id)
            .where(event.usage_submission_id.is_(None))
            .group_by(reason)
        )
        if self.organization_id is not None:
            query = query.where(event.organization_id == self.organization_id)
        with self.sessions() as session:
            return {r: int(n) for r, n in session.execute(query) if r is not None}


def _group_query(ids: Sequence[int], dialect: str) -> sa.Select[Any]:
    """Sum the claimed events per (organization, event type, hour), in SQL.

    An hour that holds the account's period boundary is split at it (`after_boundary`), so usage
    on each side is stamped inside its own billing period.
    """
    event, account = BillableEvent, BillingAccount
    hour = _hour_bucket(event.occurred_at, dialect)
    after_boundary = sa.case(
        *(
            (
                sa.and_(_hour_bucket(boundary, dialect) == hour, event.occurred_at >= boundary),
                1,
            )
            for boundary in (account.current_period_start, account.current_period_end)
        ),
        else_=0,
    )
    keys = (
        event.organization_id,
        event.event_type,
        hour.label("hour"),
        after_boundary.label("after_boundary"),
        account.stripe_customer_id,
        account.current_period_start.label("period_start"),
        account.current_period_end.label("period_end"),
    )
    return (
        sa.select(
            *keys,
            sa.func.sum(event.quantity).label("value"),
            sa.func.count().label("event_count"),
        )
        .join(account, account.organization_id == event.organization_id)
        .where(_id_in(event.id, ids, dialect))
        .group_by(*keys)
    )


def billing_window(
    hour: datetime,
    after_boundary: int,
    period_start: datetime | None,
    period_end: datetime | None,
) -> tuple[datetime, datetime]:
    """The [start, end) an outbox row covers: its hour, or the part of it on one side of the
    period boundary inside it. The meter event's timestamp is the start, so it lands in the
    period the usage belongs to."""
    end = hour + HOUR
    for boundary in (period_start, period_end):
        if boundary is not None and hour < boundary < end:
            return (boundary, end) if after_boundary else (hour, boundary)
    return hour, end


def usage_identifier(organization_id: int, event_type: str, start: datetime, token: str) -> str:
    """Stripe's dedupe key for one outbox row: fixed once written, unique across batches.

    The random batch token keeps identifiers unique even if the database is restored or its ids
    restart; a re-used identifier inside Stripe's window would silently drop real usage.
    """
    type_part = identifier_type_part(event_type)
    return f"{organization_id}-{type_part}-{start:%Y%m%d%H%M}-{token}"[:100]


def identifier_type_part(event_type: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in event_type)[:40]


def _hour_bucket(column: Any, dialect: str) -> Any:
    if dialect == "postgresql":
        return sa.func.date_trunc("hour", column, "UTC")
    return sa.func.strftime("%Y-%m-%d %H:00:00", column)


def _id_in(column: Any, ids: Sequence[int], dialect: str) -> sa.ColumnElement[bool]:
    if dialect == "postgresql":
        # One array parameter instead of thousands of bound values.
        return column == sa.any_(sa.cast(sa.literal(list(ids)), sa.ARRAY(sa.BigInteger)))
    return column.in_(ids)


def _as_utc(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite returns the strftime bucket as text
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
