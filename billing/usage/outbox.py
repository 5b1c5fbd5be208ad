"""Operator actions on the usage outbox (`usage_submissions`): list, retry, write off.

`failed`, `held` and `rejected` rows wait for a person; every flush reports them until one acts.
An action changes all the rows it names or none (each row is updated only from the status it was
read in), and leaves one `usage_submission_actions` row per changed row: what it was, who, when,
and why.

- retry `failed` → `pending`, same identifier: Stripe refused the row, so it never accepted that
  identifier, and re-sending it cannot bill twice.
- retry `held` → refused unless the operator says `reissue_held`: a held row stayed unsent past
  Stripe's identifier window, so an earlier attempt may have been accepted and a re-send with the
  same identifier is no longer deduplicated. Reconcile first (Stripe's meter event summaries for
  the row's customer and hour against the outbox); if the usage is missing, reissue gives the row
  a NEW identifier and a new send window; if it is there, write the row off.
- retry `rejected` → `pending` with a NEW identifier: Stripe accepted the request and refused the
  event afterwards (a meter error report, `usage.rejections`), so it never counted it, but it may
  still dedupe a re-send of that identifier. The row keeps its error's scope, so its next send
  follows the fixed customer link or meter mapping.
- write-off `failed`, `held` or `rejected` → `written_off`: never billed; the reason is required
  and kept.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from billing import logs
from billing.errors import OperatorError
from billing.models import (
    SubmissionAction,
    SubmissionStatus,
    UsageSubmission,
    UsageSubmissionAction,
    utcnow,
)
from billing.runtime import Runtime
from billing.usage.claiming import usage_identifier

log = logs.get_logger("billing.usage.outbox")

FAILED, HELD = SubmissionStatus.FAILED.value, SubmissionStatus.HELD.value
REJECTED = SubmissionStatus.REJECTED.value
AWAITING_OPERATOR = (FAILED, HELD, REJECTED)
LISTED_BY_DEFAULT = (
    SubmissionStatus.PENDING.value,
    FAILED,
    HELD,
    REJECTED,
    SubmissionStatus.CANCELLING.value,
)
# What `submissions retry --status` selects: rows a retry may take as they are.
RETRYABLE_STATUSES = (FAILED, REJECTED)
DEFAULT_LIMIT = 100


class SubmissionActionError(ValueError, OperatorError):
    """The action was refused as a whole: nothing was changed."""


@dataclass(frozen=True)
class ActionResult:
    action: str
    submission_ids: list[int]
    actor: str
    # Each changed row as it was and became: {id, organization_id, event_name, previous_status,
    # previous_identifier, identifier} (for the log lines; not printed).
    changes: tuple[dict[str, Any], ...] = field(default=(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "submission_ids": self.submission_ids, "actor": self.actor}


SUBMISSION_FIELDS = (
    "id",
    "status",
    "organization_id",
    "stripe_customer_id",
    "event_type",
    "event_name",
    "value",
    "event_count",
    "window_start",
    "window_end",
    "identifier",
    "attempts",
    "last_error",
    "last_error_scope",
    "created_at",
    "updated_at",
    "sent_at",
)
ACTION_FIELDS = (
    "action",
    "previous_status",
    "new_status",
    "previous_error",
    "previous_identifier",
    "reason",
    "actor",
    "created_at",
)


def _fields(row: Any, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(row, name) for name in names}


def _conditions(
    statuses: Sequence[str], organization_id: int | None, event_name: str | None
) -> list[sa.ColumnElement[bool]]:
    conditions = [UsageSubmission.status.in_(list(statuses))]
    if organization_id is not None:
        conditions.append(UsageSubmission.organization_id == organization_id)
    if event_name is not None:
        conditions.append(UsageSubmission.event_name == event_name)
    return conditions


def list_submissions(
    runtime: Runtime,
    *,
    statuses: Sequence[str] = LISTED_BY_DEFAULT,
    organization_id: int | None = None,
    event_name: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> tuple[list[dict[str, Any]], int]:
    """Outbox rows (oldest first, at most `limit`) with their audit trail, and how many match."""
    conditions = _conditions(statuses, organization_id, event_name)
    query = sa.select(UsageSubmission).where(*conditions).order_by(UsageSubmission.id)
    with runtime.session_factory() as session:
        total = session.scalar(sa.select(sa.func.count()).where(*conditions)) or 0
        rows = list(session.scalars(query.limit(limit)))
        trail: dict[int, list[dict[str, Any]]] = {}
        if rows:
            actions = session.scalars(
                sa.select(UsageSubmissionAction)
                .where(UsageSubmissionAction.submission_id.in_([r.id for r in rows]))
                .order_by(UsageSubmissionAction.id)
            )
            for action in actions:
                trail.setdefault(action.submission_id, []).append(_fields(action, ACTION_FIELDS))
    listed = [{**_fields(r, SUBMISSION_FIELDS), "actions": trail.get(r.id, [])} for r in rows]
    return listed, total


def awaiting_operator_counts(
    sessions: sessionmaker[Session], organization_id: int | None = None
) -> dict[str, int]:
    """How many rows are failed, held and rejected now, whichever run made them (every flush and
    `preflight` report these)."""
    query = (
        sa.select(UsageSubmission.status, sa.func.count())
        .where(UsageSubmission.status.in_(AWAITING_OPERATOR))
        .group_by(UsageSubmission.status)
    )
    if organization_id is not None:
        query = query.where(UsageSubmission.organization_id == organization_id)
    with sessions() as session:
        found = {status: int(n) for status, n in session.execute(query)}
    return {status: found.get(status, 0) for status in AWAITING_OPERATOR}


def submission_ids(
    runtime: Runtime,
    status: str,
    *,
    organization_id: int | None = None,
    event_name: str | None = None,
) -> list[int]:
    """The ids of the rows in `status`, oldest first; one organization's, one event name's."""
    conditions = _conditions((status,), organization_id, event_name)
    with runtime.session_factory() as session:
        query = sa.select(UsageSubmission.id).where(*conditions).order_by(UsageSubmission.id)
        return list(session.scalars(query))


def retry_submissions(
    runtime: Runtime, submission_ids: Sequence[int], *, actor: str, reissue_held: bool = False
) -> ActionResult:
    """Failed rows back to pending (same identifier), rejected ones with a new identifier; held
    rows only with `reissue_held`."""
    allowed = (FAILED, REJECTED, HELD) if reissue_held else (FAILED, REJECTED)

    def refusal(row: UsageSubmission) -> str | None:
        if row.status == HELD and not reissue_held:
            return (
                f"submission {row.id} is held: it went unsent past Stripe's identifier window, so "
                "re-sending it could bill twice. Reconcile it against Stripe's meter event "
                "summaries first, then `retry --reissue-held` (new identifier) if the usage is "
                "missing there, or `write-off` if it is billed"
            )
        if row.status not in allowed:
            return (
                f"submission {row.id} is {row.status}: only failed or rejected rows can be retried"
            )
        return None

    def change(row: UsageSubmission, now: datetime) -> dict[str, Any]:
        values: dict[str, Any] = {
            "status": SubmissionStatus.PENDING.value,
            "last_error": None,
            "last_error_scope": None,
            # A refusal may be stored under the old key; the identifier still dedupes.
            "key_generation": row.key_generation + 1,
        }
        if row.status in (HELD, REJECTED):
            token = uuid.uuid4().hex[:12]
            values |= {
                "identifier": usage_identifier(
                    row.organization_id, row.event_type, row.window_start, token
                ),
                "key_generation": 0,
                "created_at": now,  # the new identifier's resend window starts now
                "sent_at": None,
            }
        if row.status == REJECTED:
            # Stripe refused the customer or the meter: the next send follows the fixed link or
            # mapping (`usage.submitting`), which reads this scope.
            values["last_error_scope"] = row.last_error_scope
        return values

    result = _apply(
        runtime,
        submission_ids,
        actor=actor,
        reason=None,
        refusal=refusal,
        change=change,
        action_for=lambda row: (
            SubmissionAction.REISSUE if row.status in (HELD, REJECTED) else SubmissionAction.RETRY
        ),
    )
    for row in result.changes:
        if row["previous_status"] == REJECTED:
            log.info(logs.SUBMISSIONS_REQUEUED_REJECTED, extra={**row, "actor": actor})
    return result


def write_off_submissions(
    runtime: Runtime, submission_ids: Sequence[int], *, reason: str, actor: str
) -> ActionResult:
    """Failed, held or rejected rows that will never be billed; the reason is kept."""
    if not reason.strip():
        raise SubmissionActionError("a write-off needs a reason (--reason TEXT)")

    def refusal(row: UsageSubmission) -> str | None:
        if row.status not in AWAITING_OPERATOR:
            return (
                f"submission {row.id} is {row.status}: only failed, held or rejected rows can be "
                "written off"
            )
        return None

    return _apply(
        runtime,
        submission_ids,
        actor=actor,
        reason=reason.strip(),
        refusal=refusal,
        change=lambda row, now: {"status": SubmissionStatus.WRITTEN_OFF.value},
        action_for=lambda row: SubmissionAction.WRITE_OFF,
    )


def mark_held_delivered(
    runtime: Runtime, submission_ids: Sequence[int], *, reason: str, actor: str
) -> ActionResult:
    """Held rows that reconciliation found in Stripe's meter event summaries become `sent`."""

    def refusal(row: UsageSubmission) -> str | None:
        return None if row.status == HELD else f"submission {row.id} is {row.status}, not held"

    return _apply(
        runtime,
        submission_ids,
        actor=actor,
        reason=reason,
        refusal=refusal,
        change=lambda row, now: {"status": SubmissionStatus.SENT.value, "sent_at": now},
        action_for=lambda row: SubmissionAction.RECONCILED,
    )


def _apply(
    runtime: Runtime,
    submission_ids: Sequence[int],
    *,
    actor: str,
    reason: str | None,
    refusal: Callable[[UsageSubmission], str | None],
    change: Callable[[UsageSubmission, datetime], dict[str, Any]],
    action_for: Callable[[UsageSubmission], SubmissionAction],
) -> ActionResult:
    """Check every row, then change all of them in one transaction, or none."""
    ids = sorted(set(submission_ids))
    if not ids:
        raise SubmissionActionError("no submission ids given")
    now = utcnow()
    with runtime.session_factory.begin() as session:
        rows = {r.id: r for r in session.scalars(_select(ids))}
        problems = [f"submission {i} does not exist" for i in ids if i not in rows]
        problems += [p for r in rows.values() if (p := refusal(r))]
        if problems:
            raise SubmissionActionError("; ".join(problems) + "; nothing was changed")
        actions = set()
        changes = []
        for row in rows.values():
            action = action_for(row)
            actions.add(action.value)
            values = change(row, now)
            changes.append(
                {
                    "submission_id": row.id,
                    "organization_id": row.organization_id,
                    "meter": values.get("event_name", row.event_name),
                    "previous_status": row.status,
                    "previous_identifier": row.identifier,
                    "identifier": values.get("identifier", row.identifier),
                }
            )
            session.add(
                UsageSubmissionAction(
                    submission_id=row.id,
                    action=action.value,
                    previous_status=row.status,
                    new_status=values["status"],
                    previous_error=row.last_error,
                    previous_identifier=row.identifier,
                    reason=reason,
                    actor=actor,
                    created_at=now,
                )
            )
            _update_from(session, row, {**values, "updated_at": now})
    return ActionResult(
        action="+".join(sorted(actions)), submission_ids=ids, actor=actor, changes=tuple(changes)
    )


def _select(ids: Sequence[int]) -> sa.Select[tuple[UsageSubmission]]:
    # Row locks: a concurrent action on the same rows waits, then sees the new status.
    return sa.select(UsageSubmission).where(UsageSubmission.id.in_(ids)).with_for_update()


def _update_from(session: Session, row: UsageSubmission, values: dict[str, Any]) -> None:
    """Update only from the status just read: a flush that moved the row meanwhile wins."""
    changed = session.execute(
        sa.update(UsageSubmission)
        .where(UsageSubmission.id == row.id, UsageSubmission.status == row.status)
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if changed != 1:
        raise SubmissionActionError(
            f"submission {row.id} changed while being updated; nothing was changed"
        )
