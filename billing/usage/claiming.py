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

import hashlib
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from billing.checks import billability
from billing.checks.billability import HOUR, BillableRules, hour_bucket
from billing.config import Settings
from billing.models import (
    BillableEvent,
    BillingAccount,
    SubmissionStatus,
    UsageSubmission,
    id_in,
    pending_event,
)
from billing.usage.submitting import Stops

# Where the flush result's reasons are defined (kept importable from here).
UnbillableReason = billability.UnbillableReason

# Group order keeps each (organization, type, hour) whole inside one batch, except at a batch's
# edges, so a batch yields few meter events.
GROUP_ORDER = (
    BillableEvent.organization_id,
    BillableEvent.event_type,
    BillableEvent.occurred_at,
    BillableEvent.id,
)


CLAIM_WORK_MEM = "64MB"


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
    one doubles, up to `GROWTH_LIMIT` times the setting and `MAX_BATCH_ROWS`, and to about
    `MAX_BATCH_GROUPS` outbox rows. Few batches matter
    at scale: a batch's edge cuts a group (one more Stripe call), and each batch writes rows
    spread over the whole table (the pages of a backlog that does not fit PostgreSQL's buffers
    are read and written again by every batch). The portable path (SQLite) holds a batch's ids in
    memory: its batches stop at `MAX_PORTABLE_BATCH_ROWS`.
    """

    GROWTH_LIMIT = 200
    CONFLICT_ATTEMPTS = 5
    MAX_BATCH_ROWS = 1_000_000
    # Nothing is claimed while the last batch is sent, so its sending is the run's tail: a
    # backlog of a million distinct groups grew its last batch to 365,000 outbox rows, 27 s of
    # sending after the last claim (docs/performance.md, "A million groups").
    MAX_BATCH_GROUPS = 100_000
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

    def _rules(self, now: datetime, dialect: str) -> BillableRules:
        return BillableRules.of(self.settings, now, dialect, meters=self.claimable_event_types())

    def _event_filter(self, rules: BillableRules) -> list[sa.ColumnElement[bool]]:
        event = BillableEvent
        conditions = [pending_event(), *rules.row_filter()]
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
                    rules = self._rules(now, dialect)
                    if dialect == "postgresql":
                        batch = self._claim_set_based(session, rules, token)
                    else:
                        batch = self._claim_portable(session, rules, token)
                break
            except ClaimConflict:
                if attempt == self.CONFLICT_ATTEMPTS:
                    raise
        if batch is not None:
            self._grow(len(batch.submission_ids), set_based=dialect == "postgresql")
        return batch

    def _grow(self, groups: int, *, set_based: bool) -> None:
        setting = self.settings.flush_batch_size
        largest = self.MAX_BATCH_ROWS if set_based else self.MAX_PORTABLE_BATCH_ROWS
        ceiling = max(setting, min(setting * self.GROWTH_LIMIT, largest))
        grown = min(self.batch_size * 2, ceiling)
        if groups > self.MAX_BATCH_GROUPS // 2:
            # Rows that are nearly all distinct groups: the next batch keeps its outbox rows
            # near MAX_BATCH_GROUPS, at this batch's rows per group.
            grown = min(grown, max(setting, self.batch_size * self.MAX_BATCH_GROUPS // groups))
        self.batch_size = grown

    # PostgreSQL: one statement per batch -------------------------------------------------------

    def _claim_set_based(
        self, session: Session, rules: BillableRules, token: str
    ) -> ClaimedBatch | None:
        event, account, submission = BillableEvent, BillingAccount, UsageSubmission
        now = rules.now
        # Read in group order; no row lock: the link below writes each row once, in id order.
        # Locking (FOR UPDATE) or linking in group order visits pages at random, and a backlog
        # larger than PostgreSQL's buffers had each page read and written again and again
        # (figures in docs/performance.md). A concurrent claimer of the same rows is caught by the
        # link's re-check instead (`ClaimConflict`).
        picked = (
            sa.select(*GROUP_ORDER, event.quantity)
            .where(*self._event_filter(rules))
            .order_by(*GROUP_ORDER)
            .limit(self.batch_size)
            .cte("picked")
        )
        hour = hour_bucket(picked.c.occurred_at, "postgresql")
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
                hour.label("hour"),
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
        ).data([(t, self.settings.stripe_meters[t], identifier_type_part(t)) for t in rules.meters])
        w = windowed.c
        # The same identifier as `usage_identifier`, built in SQL.
        identifier = sa.func.concat(
            w.organization_id,
            "-",
            meters.c.type_part,
            "-",
            sa.func.to_char(sa.func.timezone("UTC", w.window_start), "YYYYMMDDHH24MI"),
            "-",
            token,
        )
        keys = (w.organization_id, w.stripe_customer_id, w.event_type, meters.c.event_name)
        # Summed as numeric: nothing reaches the bigint outbox `value` before the ceiling check.
        grouped = (
            sa.select(
                *keys,
                sa.func.sum(w.quantity).label("value"),
                sa.func.count().label("event_count"),
                w.window_start,
                w.window_end,
                w.hour,
                identifier.label("identifier"),
            )
            .join(meters, meters.c.event_type == w.event_type)
            .group_by(*keys, meters.c.type_part, w.window_start, w.window_end, w.hour)
            .cte("grouped")
        )
        first, last = _edge_of(picked, last=False), _edge_of(picked, last=True)
        over_ceiling = self._groups_over_ceiling(rules, (first, last), grouped)
        g = grouped.c
        group_key = (g.organization_id, g.event_type, g.hour)
        billable = sa.select(
            g.organization_id,
            g.stripe_customer_id,
            g.event_type,
            g.event_name,
            g.value,
            g.event_count,
            g.window_start,
            g.window_end,
            g.identifier,
            sa.literal(SubmissionStatus.PENDING.value),
            sa.literal(0),
            sa.literal(now, UsageSubmission.created_at.type),
            sa.literal(now, UsageSubmission.updated_at.type),
        ).where(
            ~sa.exists().where(
                *(mine == theirs for mine, theirs in zip(group_key, over_ceiling.c, strict=True))
            )
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
                billable,
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
        # Rows of a group over the ceiling have no outbox row: they stay pending.
        picked_ids = sa.cast(
            sa.select(sa.func.array_agg(picked.c.id)).scalar_subquery(), sa.ARRAY(sa.BigInteger)
        )
        linked = (
            sa.update(event)
            .values(usage_submission_id=outbox.c.id, claimed_at=now)
            .where(
                event.id == sa.any_(picked_ids),
                pending_event(),  # re-checked on the latest row version
                outbox.c.organization_id == event.organization_id,
                outbox.c.event_type == event.event_type,
                event.occurred_at >= outbox.c.window_start,
                event.occurred_at < outbox.c.window_end,
            )
            .returning(event.id)
            .cte("linked")
        )
        statement = sa.select(
            *last.c[:4],
            sa.select(sa.func.count()).select_from(picked).scalar_subquery().label("picked"),
            sa.select(sa.func.count()).select_from(linked).scalar_subquery().label("linked"),
            sa.select(sa.func.coalesce(sa.func.sum(outbox.c.event_count), 0))
            .scalar_subquery()
            .label("grouped"),
            sa.select(sa.func.array_agg(outbox.c.id)).scalar_subquery().label("submission_ids"),
        )
        # Every join here is between CTEs, whose sizes PostgreSQL cannot estimate (a batch of
        # thousands of rows and its outbox rows were each taken for a handful): on such
        # estimates it chose a nested loop for the link, outbox rows x batch rows comparisons,
        # quadratic in the batch. Hash joins stay linear at any size; the pick (an index scan
        # under its LIMIT) and the edge groups' sums (index range scans) are no joins.
        session.execute(sa.text("SET LOCAL enable_nestloop = off"))
        # With 1M distinct groups a batch's rows, groups and outbox rows are each ~10^5-10^6: at
        # the default 4 MB the pick's and the aggregate's sorts spilled to disk (external merge,
        # 2.4 s of an 18 s batch of 365,000 groups). 64 MB holds them in memory for this
        # transaction only (docs/performance.md, "Claiming a million groups").
        session.execute(sa.text(f"SET LOCAL work_mem = '{CLAIM_WORK_MEM}'"))
        row = session.execute(statement).one_or_none()
        if row is None:
            return None
        if row.linked != row.grouped:
            # Another claimer linked (or an operator dismissed) some of these rows after they
            # were read: this batch's outbox rows would count them twice. Roll back, pick again.
            raise ClaimConflict(f"grouped {row.grouped} billable events but linked {row.linked}")
        self._cursor = tuple(row[:4])
        return ClaimedBatch(
            picked=row.picked, events=row.linked, submission_ids=sorted(row.submission_ids or [])
        )

    @staticmethod
    def _groups_over_ceiling(rules: BillableRules, edges: tuple[Any, Any], grouped: Any) -> Any:
        """The (organization, event type, hour) groups of the batch whose billable rows sum above
        STRIPE_USAGE_MAX_GROUP_QUANTITY. A group inside the batch is all there (the batch is a
        run of rows in group order); only the first and the last group may continue outside it,
        so only theirs is summed over the table (two index range scans)."""
        edge_groups = sa.union(
            *(sa.select(e.c.organization_id, e.c.event_type, e.c.hour) for e in edges)
        ).cte("edges")
        e = edge_groups.c
        edge_totals = sa.select(
            e.organization_id,
            e.event_type,
            e.hour,
            rules.group_total(e.organization_id, e.event_type, e.hour, e.hour + HOUR).label(
                "total"
            ),
        ).cte("edge_totals")
        g = grouped.c
        key = (g.organization_id, g.event_type, g.hour)
        in_batch = (
            sa.select(*key, sa.func.sum(g.value).label("total")).group_by(*key).subquery("hours")
        )
        h, t = in_batch.c, edge_totals.c
        joined = sa.and_(
            h.organization_id == t.organization_id, h.event_type == t.event_type, h.hour == t.hour
        )
        return (
            sa.select(h.organization_id, h.event_type, h.hour)
            .select_from(in_batch.outerjoin(edge_totals, joined))
            .where(rules.over_group_ceiling(sa.func.coalesce(t.total, h.total)))
            .cte("over_ceiling")
        )

    # Portable (SQLite): pick, group, insert, link -----------------------------------------------

    def _claim_portable(
        self, session: Session, rules: BillableRules, token: str
    ) -> ClaimedBatch | None:
        event = BillableEvent
        dialect = rules.dialect
        now = rules.now
        if dialect == "sqlite":
            # SQLite has no row locks: take the write lock up front so two claimers serialise.
            session.execute(sa.text("UPDATE billable_events SET id = id WHERE 0"))
        pick = (
            sa.select(*GROUP_ORDER, event.quantity)
            .join(BillingAccount, BillingAccount.organization_id == event.organization_id)
            .where(*self._event_filter(rules), *self._account_filter())
            .order_by(*GROUP_ORDER)
            .limit(self.batch_size)
        )
        picked = session.execute(pick).all()
        if not picked:
            return None
        self._cursor = tuple(picked[-1][:4])
        over_ceiling = _portable_groups_over_ceiling(session, rules, picked)
        ids = [row.id for row in picked if _group_of(row) not in over_ceiling]
        if not ids:
            return ClaimedBatch(picked=len(picked), events=0, submission_ids=[])
        groups = session.execute(_group_query(ids, dialect)).all()
        rows = [self._outbox_row(group, token, now) for group in groups]
        submission_ids = list(
            session.scalars(sa.insert(UsageSubmission).returning(UsageSubmission.id), rows)
        )
        submission = UsageSubmission
        linked = session.execute(
            sa.update(event)
            .where(
                id_in(event.id, ids, dialect),
                pending_event(),
                id_in(submission.id, submission_ids, dialect),
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
        return ClaimedBatch(picked=len(picked), events=len(ids), submission_ids=submission_ids)

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
        """Pending rows this flush set aside, by reason (`billing.billability`). Nothing is
        dropped: each stays pending until it is fixed and billed, or dismissed."""
        with self.sessions() as session:
            rules = BillableRules.of(self.settings, self.clock(), session.get_bind().dialect.name)
            return billability.count_unbillable(session, rules, self.organization_id)


def _edge_of(picked: Any, *, last: bool) -> Any:
    """The first or the last picked row (group order): where the batch may cut a group."""
    order = [c.desc() if last else c for c in picked.c[:4]]
    hour = hour_bucket(picked.c.occurred_at, "postgresql").label("hour")
    return sa.select(*picked.c[:4], hour).order_by(*order).limit(1).cte("last" if last else "first")


def _group_of(row: Any) -> tuple[int, str, datetime]:
    return (
        row.organization_id,
        row.event_type,
        _as_utc(row.occurred_at).replace(minute=0, second=0, microsecond=0),
    )


def _portable_groups_over_ceiling(
    session: Session, rules: BillableRules, picked: Sequence[Any]
) -> set[tuple[int, str, datetime]]:
    """`Claimer._groups_over_ceiling`, for the portable path (the batch's rows are in memory)."""
    totals: Counter[tuple[int, str, datetime]] = Counter()
    for row in picked:
        totals[_group_of(row)] += int(row.quantity)
    for organization_id, event_type, hour in {_group_of(picked[0]), _group_of(picked[-1])}:
        totals[(organization_id, event_type, hour)] = session.scalar(
            sa.select(rules.group_total(organization_id, event_type, hour, hour + HOUR))
        )
    return {group for group, total in totals.items() if total > rules.max_group_quantity}


def _group_query(ids: Sequence[int], dialect: str) -> sa.Select[Any]:
    """Sum the claimed events per (organization, event type, hour), in SQL.

    An hour that holds the account's period boundary is split at it (`after_boundary`), so usage
    on each side is stamped inside its own billing period.
    """
    event, account = BillableEvent, BillingAccount
    hour = hour_bucket(event.occurred_at, dialect)
    after_boundary = sa.case(
        *(
            (
                sa.and_(hour_bucket(boundary, dialect) == hour, event.occurred_at >= boundary),
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
        .where(id_in(event.id, ids, dialect))
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
    return f"{organization_id}-{type_part}-{start:%Y%m%d%H%M}-{token}"


# An event type of at most 40 word characters is its own part of the identifier.
KEPT_TYPE = re.compile(r"[A-Za-z0-9_]{1,40}")
HASHED_PREFIX = 32
HASH_HEX = 16


def identifier_type_part(event_type: str) -> str:
    """The event type's part of an identifier: a different one for every event type.

    Two types must never share it: `api_call` and `api.call` mapped to one meter once made one
    identifier in one organization-hour, and the second outbox row broke
    `uq_usage_submissions_identifier` on every flush, stopping all billing. A type of at most 40
    word characters (ASCII letters, digits, `_`) is kept as it is; any other becomes its prefix
    (non-word characters as `_`) plus `-` and 64 bits of the SHA-256 of the exact type. A kept
    type never holds a `-`, so a kept and a hashed part never meet, and two hashed ones only on
    a hash collision. At most 49 characters: with a 20-character organization id (a negative
    bigint), 12 of time, 12 of token and 3 dashes, the identifier stays within Stripe's 100.
    Identifiers already written keep the form they were written with.
    """
    if KEPT_TYPE.fullmatch(event_type):
        return event_type
    prefix = re.sub(r"[^A-Za-z0-9_]", "_", event_type[:HASHED_PREFIX])
    digest = hashlib.sha256(event_type.encode()).hexdigest()[:HASH_HEX]
    return f"{prefix}-{digest}"


def _as_utc(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite returns the strftime bucket as text
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
