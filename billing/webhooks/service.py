"""The webhook_events lifecycle: verify and store a delivery, process a stored event, sweep.

received → processing → processed | ignored | failed. Each step is a compare-and-set on the row's
status, so a duplicate delivery, a redelivered task or the sweep can never run a handler twice at
the same time; handlers are idempotent besides, so a re-run after a crash is harmless.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from billing import logs, metrics
from billing.config import Settings
from billing.errors import OperatorError
from billing.models import WebhookEvent, WebhookStatus, utcnow
from billing.runtime import Runtime
from billing.stripe_gateway import signature_timestamp, signed_with
from billing.webhooks import prepared_insert

log = logs.get_logger("billing.webhooks")

Enqueue = Callable[[str], None]  # publishes the processing task now, or raises
HandOff = Callable[[str, dict[str, Any]], bool]  # publishes it soon; False if refused
Handler = Callable[[Runtime, Mapping[str, Any]], None]

# Stripe's v1 events are `event`; thin v2 events (v1.billing.meter.error_report_triggered) are
# `v2.core.event`.
EVENT_OBJECTS = frozenset({"event", "v2.core.event"})
MAX_EVENT_NAME_LENGTH = 255  # webhook_events.stripe_event_id and .type


class WebhookRejected(Exception):
    """A delivery we refuse: nothing is stored; `status` is the HTTP answer, `kind` the metric
    label (`signature`, `timestamp`, `payload`, `too_large`, `not_configured`)."""

    def __init__(self, reason: str, status: int = 400, kind: str = "payload") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.kind = kind


class EventIgnored(Exception):
    """A handler found nothing to do, for a reason worth keeping (e.g. the invoice was deleted):
    the event ends `ignored` with the reason as its `last_error`, not as a dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IngestOutcome(enum.StrEnum):
    ACCEPTED = "accepted"  # stored; its task is on its way to the broker
    STORED_NOT_QUEUED = "stored_not_queued"  # the publisher refused it: the sweep queues it
    DUPLICATE = "duplicate"


class ProcessOutcome(enum.StrEnum):
    PROCESSED = "processed"
    IGNORED = "ignored"  # no handler for this type, or the handler found nothing to do
    ALREADY_DONE = "already_done"  # processed or ignored before
    BUSY = "busy"  # another worker holds it
    RETRY = "retry"  # failed transiently, back to received for the next attempt
    FAILED = "failed"  # dead letter: kept with its error for `webhooks replay`
    MISSING = "missing"


# Verification ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """A verified delivery: the event, and the body's text as Stripe signed it (stored as is)."""

    event: dict[str, Any]
    text: str


def verify_delivery(
    body: bytes, signature: str | None, settings: Settings, now: float | None = None
) -> Delivery:
    """The delivery, if `body` is signed by one of our secrets within the tolerance, both ways.

    stripe-python checks only that a timestamp is not too old; a timestamp far in the future is
    refused here too, or a captured request could be replayed for as long as its timestamp says.
    """
    secrets = settings.webhook_secrets
    if not secrets:
        raise WebhookRejected("STRIPE_WEBHOOK_SECRET is not set", status=500, kind="not_configured")
    if not signature:
        raise WebhookRejected("missing Stripe-Signature header", kind="signature")
    try:
        payload = body.decode("utf-8")
        timestamp = signature_timestamp(signature)
    except (UnicodeDecodeError, ValueError):
        raise WebhookRejected(
            "malformed Stripe-Signature header or body encoding", kind="signature"
        ) from None
    skew = (time.time() if now is None else now) - timestamp
    if abs(skew) > settings.webhook_tolerance_seconds:
        raise WebhookRejected(
            f"signature timestamp outside the tolerance ({round(skew)} s)", kind="timestamp"
        )
    if not any(signed_with(payload, signature, secret) for secret in secrets):
        raise WebhookRejected("no valid signature for any configured secret", kind="signature")
    return Delivery(parse_event(payload), payload)


def parse_event(payload: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise WebhookRejected("body is not JSON") from None
    if not (
        isinstance(event, dict)
        and event.get("object") in EVENT_OBJECTS
        and _storable_name(event.get("id"))
        and event["id"].startswith("evt_")
        and _storable_name(event.get("type"))
    ):
        raise WebhookRejected("body is not a Stripe event")
    return event


def _storable_name(value: Any) -> bool:
    """An event id or type the row can hold: a 500 for one the database refuses (too long, a
    NUL) would have Stripe redeliver it for days; Stripe's own are short and printable."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_EVENT_NAME_LENGTH
        and value.isprintable()
        and " " not in value
    )


# Ingest ---------------------------------------------------------------------------------------


def ingest(runtime: Runtime, delivery: Delivery, hand_off: HandOff) -> IngestOutcome:
    """Store a verified event once (by Stripe's id), then hand its processing task to the
    process's publisher (`billing.broker.BackgroundPublisher`), which publishes it within its
    linger (50 ms by default) and logs `accepted and queued` then (`report_queued`), or, if the
    broker refuses, leaves the row `received` for the sweep (`report_not_queued`). The answer
    does not wait for the broker: the row is what makes the delivery safe."""
    event = delivery.event
    fields = {"event_id": event["id"], "event_type": event["type"]}
    metrics.WEBHOOKS_RECEIVED.inc()
    if not store_once(runtime.ingest_engine, event, delivery.text):
        metrics.WEBHOOKS_DUPLICATE.inc()
        log.info(logs.WEBHOOK_DUPLICATE, extra=fields)
        return IngestOutcome.DUPLICATE
    if not hand_off(event["id"], fields):
        log.warning(logs.WEBHOOK_ENQUEUE_FAILED, extra={**fields, "error": "publisher backlog"})
        return IngestOutcome.STORED_NOT_QUEUED
    return IngestOutcome.ACCEPTED


def report_queued(published: list[dict[str, Any]]) -> None:
    for fields in published:
        log.info(logs.WEBHOOK_ACCEPTED, extra=fields)


def report_not_queued(refused: list[dict[str, Any]], error: BaseException) -> None:
    for fields in refused:  # the rows stay `received`: the sweep queues them
        log.warning(logs.WEBHOOK_ENQUEUE_FAILED, extra={**fields, "error": type(error).__name__})


def store_once(engine: Engine, event: dict[str, Any], text: str | None = None) -> bool:
    """Insert the event unless its id is known; True if this call stored it. On PostgreSQL,
    `text` (the delivered JSON, if given) is stored as is: serializing the event again was a
    noticeable share of the insert's CPU (figures in docs/performance.md).

    The unique constraint decides between concurrent duplicates: the loser's insert does nothing
    (ON CONFLICT DO NOTHING) instead of failing, so both answer 200 and only one is queued.
    It runs for every delivery, on an autocommit engine without pre-ping
    (`Runtime.ingest_engine`). On PostgreSQL the statement, compiled once, goes straight to the
    pooled psycopg2 connection, prepared in its session (`prepared_insert`): SQLAlchemy's
    per-execution work was a large share of an ingest's CPU (figures in docs/performance.md). A
    pooled connection the server dropped fails without writing anything; the insert is tried
    once more on a new one.
    """
    now = utcnow()
    row = {
        "stripe_event_id": event["id"],
        "type": event["type"],
        "payload": event,
        "status": WebhookStatus.RECEIVED.value,
        "attempts": 0,
        "received_at": now,
        "updated_at": now,
    }
    if engine.dialect.name != "postgresql":
        with engine.connect() as connection:
            return connection.execute(_insert_event(engine.dialect.name), row).rowcount == 1
    row["payload"] = json.dumps(event) if text is None else text
    dropped = engine.dialect.loaded_dbapi.OperationalError
    for attempt in (1, 2):
        connection = engine.raw_connection()
        try:
            return prepared_insert.insert(connection, _insert_event("postgresql"), row) == 1
        except dropped:
            connection.invalidate()
            if attempt == 2:
                raise
        finally:
            connection.close()
    raise AssertionError("unreachable")


@functools.cache
def _insert_event(dialect: str) -> sa.Insert:
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[dialect]
    # inline(): the id is the table's own default, not fetched back (no RETURNING).
    return (
        insert(WebhookEvent.__table__)
        .inline()
        .on_conflict_do_nothing(index_elements=["stripe_event_id"])
    )


def try_enqueue(enqueue: Enqueue, event_id: str, fields: dict[str, Any]) -> bool:
    try:
        enqueue(event_id)
    except Exception as error:  # any broker failure: the row is safe, the sweep queues it
        report_not_queued([fields], error)
        return False
    return True


# Processing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    event_id: str
    event_type: str
    payload: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class Unclaimed:
    outcome: ProcessOutcome
    event_type: str | None


def claim(runtime: Runtime, event_id: str, now: datetime) -> Claim | Unclaimed:
    """received (or processing abandoned past the timeout) → processing, atomically."""
    stale = now - timedelta(seconds=runtime.settings.webhook_processing_timeout_seconds)
    table = WebhookEvent.__table__
    with runtime.session_factory.begin() as session:
        claimed = session.execute(
            sa.update(table)
            .where(
                table.c.stripe_event_id == event_id,
                sa.or_(
                    table.c.status == WebhookStatus.RECEIVED.value,
                    sa.and_(
                        table.c.status == WebhookStatus.PROCESSING.value,
                        table.c.updated_at < stale,
                    ),
                ),
            )
            .values(
                status=WebhookStatus.PROCESSING.value, attempts=table.c.attempts + 1, updated_at=now
            )
            .returning(table.c.type, table.c.payload, table.c.attempts)
        ).first()
        if claimed is not None:
            return Claim(event_id, claimed.type, claimed.payload, claimed.attempts)
        found = session.execute(
            sa.select(table.c.status, table.c.type).where(table.c.stripe_event_id == event_id)
        ).first()
    if found is None:
        return Unclaimed(ProcessOutcome.MISSING, None)
    if found.status in (WebhookStatus.PROCESSED, WebhookStatus.IGNORED):
        return Unclaimed(ProcessOutcome.ALREADY_DONE, found.type)
    if found.status == WebhookStatus.FAILED:
        return Unclaimed(ProcessOutcome.FAILED, found.type)
    return Unclaimed(ProcessOutcome.BUSY, found.type)


def process_event(
    runtime: Runtime,
    event_id: str,
    handlers: Mapping[str, Handler],
    *,
    final_attempt: bool,
    transient_errors: tuple[type[BaseException], ...],
) -> ProcessOutcome:
    """Run the event's handler once. A transient error goes back to `received` and is re-raised
    for the task to retry, unless this was the final attempt; anything else is a dead letter."""
    claimed = claim(runtime, event_id, utcnow())
    if isinstance(claimed, Unclaimed):
        _log_unclaimed(event_id, claimed)
        return claimed.outcome
    fields = {"event_id": event_id, "event_type": claimed.event_type, "attempt": claimed.attempts}
    handler = handlers.get(claimed.event_type)
    if handler is None:
        _finish(runtime, event_id, WebhookStatus.IGNORED)
        log.info(logs.WEBHOOK_EVENT_IGNORED, extra=fields)
        return ProcessOutcome.IGNORED
    log.info(logs.WEBHOOK_PROCESSING_STARTED, extra=fields)
    started = time.perf_counter()
    try:
        with logs.bind(event_id=event_id, event_type=claimed.event_type):
            handler(runtime, claimed.payload)
    except EventIgnored as ignored:
        _finish(runtime, event_id, WebhookStatus.IGNORED, reason=ignored.reason)
        log.info(logs.WEBHOOK_EVENT_IGNORED, extra={**fields, "reason": ignored.reason})
        return ProcessOutcome.IGNORED
    except Exception as error:
        metrics.WEBHOOKS_FAILED.labels(type=claimed.event_type).inc()
        transient = isinstance(error, transient_errors)
        retry = transient and not final_attempt
        _record_failure(runtime, event_id, error, retry=retry)
        log.log(
            logging.WARNING if retry else logging.ERROR,
            logs.WEBHOOK_PROCESSING_FAILED,
            extra={**fields, "error": str(error), "will_retry": retry},
        )
        if retry:
            raise
        return ProcessOutcome.FAILED
    _finish(runtime, event_id, WebhookStatus.PROCESSED)
    metrics.WEBHOOKS_PROCESSED.labels(type=claimed.event_type).inc()
    log.info(
        logs.WEBHOOK_PROCESSING_COMPLETED,
        extra={**fields, "duration_ms": round((time.perf_counter() - started) * 1000, 1)},
    )
    return ProcessOutcome.PROCESSED


def _log_unclaimed(event_id: str, unclaimed: Unclaimed) -> None:
    outcome = unclaimed.outcome
    fields = {"event_id": event_id, "event_type": unclaimed.event_type, "outcome": outcome.value}
    if outcome == ProcessOutcome.ALREADY_DONE:
        log.info(logs.WEBHOOK_ALREADY_PROCESSED, extra=fields)
    elif outcome == ProcessOutcome.MISSING:
        log.warning(logs.WEBHOOK_UNKNOWN_EVENT, extra=fields)
    else:
        log.info(logs.WEBHOOK_NOT_CLAIMED, extra=fields)


def _finish(
    runtime: Runtime, event_id: str, status: WebhookStatus, *, reason: str | None = None
) -> None:
    """The event done; `reason` (why it was ignored) is kept where `webhooks list` shows errors."""
    now = utcnow()
    _set(
        runtime,
        event_id,
        status=status.value,
        processed_at=now,
        updated_at=now,
        last_error=reason[:4000] if reason else None,
        last_traceback=None,
    )


def _record_failure(runtime: Runtime, event_id: str, error: BaseException, *, retry: bool) -> None:
    status = WebhookStatus.RECEIVED if retry else WebhookStatus.FAILED
    _set(
        runtime,
        event_id,
        status=status.value,
        updated_at=utcnow(),
        last_error=f"{type(error).__name__}: {error}"[:4000],
        last_traceback="".join(traceback.format_exception(error))[-16000:],
    )


def _set(runtime: Runtime, event_id: str, **values: Any) -> None:
    table = WebhookEvent.__table__
    with runtime.session_factory.begin() as session:
        session.execute(
            sa.update(table).where(table.c.stripe_event_id == event_id).values(**values)
        )


# Sweep and replay -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    queued: list[str]
    not_queued: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"queued": len(self.queued), "not_queued": len(self.not_queued)}


def sweep_stuck(
    runtime: Runtime, enqueue: Enqueue, *, now: datetime | None = None, limit: int = 500
) -> SweepResult:
    """Queue again what no task is working on: `received` rows older than the requeue delay
    (the broker was down, or the message was lost) and `processing` rows older than the
    processing timeout (the worker died). Each one's clock restarts, so a slow queue is not
    flooded with copies every sweep."""
    now = now or utcnow()
    settings = runtime.settings
    table = WebhookEvent.__table__
    received_before = now - timedelta(seconds=settings.webhook_requeue_after_seconds)
    processing_before = now - timedelta(seconds=settings.webhook_processing_timeout_seconds)
    with runtime.session_factory.begin() as session:
        rows = session.execute(
            sa.select(table.c.stripe_event_id, table.c.type)
            .where(
                sa.or_(
                    sa.and_(
                        table.c.status == WebhookStatus.RECEIVED.value,
                        table.c.updated_at < received_before,
                    ),
                    sa.and_(
                        table.c.status == WebhookStatus.PROCESSING.value,
                        table.c.updated_at < processing_before,
                    ),
                )
            )
            .order_by(table.c.received_at)
            .limit(limit)
        ).all()
        ids = [row.stripe_event_id for row in rows]
        if ids:
            session.execute(
                sa.update(table)
                .where(
                    table.c.stripe_event_id.in_(ids), table.c.status == WebhookStatus.RECEIVED.value
                )
                .values(updated_at=now)
            )
    queued: list[str] = []
    not_queued: list[str] = []
    for row in rows:
        fields = {"event_id": row.stripe_event_id, "event_type": row.type}
        (queued if try_enqueue(enqueue, row.stripe_event_id, fields) else not_queued).append(
            row.stripe_event_id
        )
        log.info(logs.WEBHOOK_REQUEUED, extra=fields)
    return SweepResult(queued, not_queued)


class ReplayRefused(OperatorError):
    """The event cannot be replayed as asked (unknown, or processed without --force)."""


def reset_for_replay(runtime: Runtime, event_id: str, *, force: bool = False) -> str:
    """failed/ignored/received (or, with force, processed) → received; returns the old status."""
    table = WebhookEvent.__table__
    allowed = [WebhookStatus.FAILED, WebhookStatus.IGNORED, WebhookStatus.RECEIVED]
    if force:
        allowed.append(WebhookStatus.PROCESSED)
    with runtime.session_factory.begin() as session:
        status = session.execute(
            sa.select(table.c.status).where(table.c.stripe_event_id == event_id).with_for_update()
        ).scalar()
        if status is None:
            raise ReplayRefused(f"no stored webhook event {event_id}")
        if status not in allowed:
            hint = " (use --force to run its handler again)" if status == "processed" else ""
            raise ReplayRefused(f"event {event_id} is {status}{hint}")
        session.execute(
            sa.update(table)
            .where(table.c.stripe_event_id == event_id)
            .values(status=WebhookStatus.RECEIVED.value, updated_at=utcnow())
        )
    return str(status)


def list_events(
    runtime: Runtime, *, status: str | None, event_type: str | None, limit: int
) -> list[dict[str, Any]]:
    table = WebhookEvent.__table__
    query = (
        sa.select(
            table.c.stripe_event_id,
            table.c.type,
            table.c.status,
            table.c.attempts,
            table.c.last_error,
            table.c.received_at,
            table.c.processed_at,
            table.c.updated_at,
        )
        .order_by(table.c.received_at.desc())
        .limit(limit)
    )
    if status:
        query = query.where(table.c.status == status)
    if event_type:
        query = query.where(table.c.type == event_type)
    with runtime.session_factory() as session:
        return [dict(row._mapping) for row in session.execute(query)]
