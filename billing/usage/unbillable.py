"""Unbillable usage: the pending rows the flush sets aside (`billing.billability`), listed with
their reason, and dismissed by an operator when they must never be billed.

A row set aside stays pending: fixing it (by plain SQL upstream) or the configuration (a meter, a
billing account, a ceiling) bills it on the next flush, exactly once. Usage that must never be
billed is dismissed instead: all of it or nothing, in one transaction, and only rows that are
pending and unbillable right now (a row the next flush would bill is refused, and so is one already
claimed or dismissed). A dismissal writes one `usage_dismissals` row per unbillable reason (who,
when, why, how many, which reason) and points the rows at it; nothing is deleted. A dismissed row
is no longer pending: the flush, the backlog and unbillable gauges and `BillingUnbilledUsageTooOld`
leave it at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from billing.checks.billability import REASONS, BillableRules, unbillable_events
from billing.errors import OperatorError
from billing.models import BillableEvent, UsageDismissal, pending_event, utcnow
from billing.runtime import Runtime

DEFAULT_LIMIT = 100
PROBLEMS_SHOWN = 10
SERIALIZATION_FAILURE = "40001"


class DismissalError(ValueError, OperatorError):
    """The dismissal was refused as a whole: nothing was changed."""


@dataclass(frozen=True)
class UnbillableListing:
    counts: dict[str, int]  # every reason, over the organization asked for (or all)
    total: int  # rows that match the reason asked for (or all reasons)
    events: list[dict[str, Any]]  # at most `limit` of them, by id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DismissalResult:
    event_count: int
    reason: str
    actor: str
    organization_id: int | None
    event_ids: list[int]  # when dismissed by id
    dismissals: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"action": "dismiss", **asdict(self)}


def _event_fields(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "reason": row.reason,
        "organization_id": row.organization_id,
        "event_type": row.event_type,
        # As text: exact (a numeric 1E+30 or 1.5000), whatever the column's type.
        "quantity": None if row.quantity is None else str(row.quantity),
        "occurred_at": row.occurred_at,
    }


def _rules(runtime: Runtime, session: Session) -> BillableRules:
    return BillableRules.of(runtime.settings, utcnow(), session.get_bind().dialect.name)


def list_unbillable(
    runtime: Runtime,
    *,
    organization_id: int | None = None,
    reason: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> UnbillableListing:
    """Pending rows the flush sets aside now, by id, with the counts by reason."""
    if reason is not None and reason not in REASONS:
        raise DismissalError(f"unknown unbillable reason {reason!r}: one of {', '.join(REASONS)}")
    with runtime.session_factory() as session:
        scope = None if organization_id is None else [organization_id]
        unbillable = unbillable_events(_rules(runtime, session), scope)
        by_reason = sa.select(unbillable.c.reason, sa.func.count()).group_by(unbillable.c.reason)
        counts = {**dict.fromkeys(REASONS, 0), **dict(session.execute(by_reason).all())}
        query = sa.select(unbillable).order_by(unbillable.c.id).limit(limit)
        if reason is not None:
            query = query.where(unbillable.c.reason == reason)
        events = [_event_fields(row) for row in session.execute(query)]
    total = counts[reason] if reason is not None else sum(counts.values())
    return UnbillableListing(counts=counts, total=total, events=events)


def dismiss_unbillable(
    runtime: Runtime,
    *,
    reason: str,
    actor: str,
    event_ids: Sequence[int] = (),
    organization_id: int | None = None,
    unbillable: str | None = None,
) -> DismissalResult:
    """Dismiss pending unbillable rows: the ones named by id, or an organization's (those set
    aside for `unbillable`, or all). Every row or none."""
    text = reason.strip()
    if not text:
        raise DismissalError("a dismissal needs a reason (--reason TEXT)")
    ids = sorted(set(event_ids))
    if bool(ids) == (organization_id is not None):
        raise DismissalError("give billable event ids or an organization (not both)")
    if unbillable is not None and (ids or unbillable not in REASONS):
        raise DismissalError(f"--unbillable takes one of {', '.join(REASONS)}, with --org-id only")
    try:
        with runtime.session_factory.begin() as session:
            rules = _begin_consistent(session, runtime)
            if ids:
                scope = _refuse_ineligible(session, rules, ids)
                candidates = unbillable_events(rules, scope)
                chosen = [candidates.c.id.in_(ids)]
            else:
                assert organization_id is not None
                candidates = unbillable_events(rules, [organization_id])
                chosen = [] if unbillable is None else [candidates.c.reason == unbillable]
            counts = _counts(session, candidates, chosen)
            if not counts:
                wanted = f" set aside as {unbillable}" if unbillable else ""
                raise DismissalError(
                    f"organization {organization_id} has no pending unbillable rows{wanted}: "
                    "nothing to dismiss"
                )
            dismissals = [
                _dismiss(session, candidates, chosen, unbillable_reason, count, text, actor)
                for unbillable_reason, count in counts.items()
            ]
    except sa.exc.OperationalError as error:
        if getattr(error.orig, "pgcode", None) != SERIALIZATION_FAILURE:
            raise
        raise DismissalError(
            "rows changed while being dismissed (a flush claimed some?): nothing was changed; "
            "list them again with `flask billing usage unbillable`"
        ) from error
    return DismissalResult(
        event_count=sum(counts.values()),
        reason=text,
        actor=actor,
        organization_id=organization_id,
        event_ids=ids,
        dismissals=dismissals,
    )


def _begin_consistent(session: Session, runtime: Runtime) -> BillableRules:
    """One view of the rows from the count to the last update: on PostgreSQL a REPEATABLE READ
    snapshot (a flush that claims one of them meanwhile makes the dismissal fail whole, rather
    than dismiss fewer rows than counted, or rows counted by none); on SQLite the write lock."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    else:
        session.execute(sa.text("UPDATE billable_events SET id = id WHERE 0"))
    return _rules(runtime, session)


def _refuse_ineligible(
    session: Session, rules: BillableRules, ids: Sequence[int]
) -> list[int] | None:
    """Refuse ids that name no row, a row claimed or dismissed already, or one the next flush
    would bill. Returns the organizations to classify (None: all of them)."""
    event = BillableEvent
    rows = {
        row.id: row
        for row in session.execute(
            sa.select(
                event.id, event.organization_id, event.usage_submission_id, event.usage_dismissal_id
            ).where(event.id.in_(ids))
        )
    }
    organizations = {row.organization_id for row in rows.values()}
    scope = None if None in organizations else sorted(organizations)
    candidates = unbillable_events(rules, scope)
    unbillable = set(session.scalars(sa.select(candidates.c.id).where(candidates.c.id.in_(ids))))
    problems = []
    for event_id in ids:
        row = rows.get(event_id)
        if row is None:
            problems.append(f"billable event {event_id} does not exist")
        elif row.usage_submission_id is not None:
            problems.append(
                f"billable event {event_id} is claimed already (usage submission "
                f"{row.usage_submission_id}; see `flask billing submissions list`)"
            )
        elif row.usage_dismissal_id is not None:
            problems.append(
                f"billable event {event_id} is dismissed already (dismissal "
                f"{row.usage_dismissal_id})"
            )
        elif event_id not in unbillable:
            problems.append(f"billable event {event_id} is billable now: the next flush bills it")
    if problems:
        shown = problems[:PROBLEMS_SHOWN]
        if len(problems) > PROBLEMS_SHOWN:
            shown.append(f"and {len(problems) - PROBLEMS_SHOWN} more")
        raise DismissalError("; ".join(shown) + "; nothing was changed")
    return scope


def _counts(
    session: Session, candidates: sa.Subquery, chosen: list[sa.ColumnElement[bool]]
) -> dict[str, int]:
    query = (
        sa.select(candidates.c.reason, sa.func.count()).where(*chosen).group_by(candidates.c.reason)
    )
    found = dict(session.execute(query).all())
    # Group reasons last: dismissing a row set aside for its own sake changes no group's sum.
    return {reason: int(found[reason]) for reason in REASONS if reason in found}


def _dismiss(
    session: Session,
    candidates: sa.Subquery,
    chosen: list[sa.ColumnElement[bool]],
    unbillable_reason: str,
    count: int,
    reason: str,
    actor: str,
) -> dict[str, Any]:
    dismissal = UsageDismissal(
        unbillable_reason=unbillable_reason,
        event_count=count,
        reason=reason,
        actor=actor,
        created_at=utcnow(),
    )
    session.add(dismissal)
    session.flush()
    rows = sa.select(candidates.c.id).where(*chosen, candidates.c.reason == unbillable_reason)
    session.execute(
        sa.update(BillableEvent)
        .where(BillableEvent.id.in_(rows), pending_event())
        .values(usage_dismissal_id=dismissal.id)
        .execution_options(synchronize_session=False)
    )
    # Counted, not the rowcount: pysqlite reports none for an UPDATE that starts with WITH.
    changed = session.scalar(
        sa.select(sa.func.count()).where(BillableEvent.usage_dismissal_id == dismissal.id)
    )
    if changed != count:  # cannot happen under the snapshot; money depends on it, so check
        raise DismissalError(
            f"{count} {unbillable_reason} row(s) counted but {changed} dismissed: nothing was "
            "changed"
        )
    return {"id": dismissal.id, "unbillable_reason": unbillable_reason, "event_count": count}
