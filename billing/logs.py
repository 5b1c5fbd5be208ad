"""Structured logging: JSON lines with stable field names, and the guide's messages as constants.

The messages are a public interface (dashboards and alerts filter on them): change none of them.
Structured fields go in `extra=` (`organization_id`, `idempotency_key`, `event_id`, `task_id`,
counts, `duration_ms`); `bind()` adds fields to every record logged inside its block.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

from pythonjsonlogger.json import JsonFormatter

LOGGER_NAME = "billing"

# Usage flush
FLUSH_STARTED = "Stripe usage flush started"
FLUSH_NO_PENDING = "Stripe usage flush found no pending events"
FLUSH_COMPLETED = "Stripe usage flush completed"
FLUSH_BATCH_STARTED = "Stripe usage flush batch started"
FLUSH_BATCH_COMPLETED = "Stripe usage flush batch completed"
FLUSH_FANOUT_STARTED = "Stripe usage flush handed its submissions to submit tasks"
FLUSH_FANOUT_UNQUEUED = "Stripe usage flush could not queue its submit tasks; sending alone"
FLUSH_FANOUT_COMPLETED = "Stripe usage flush submit tasks completed"
# Meter submission
METER_SUBMIT_ATTEMPT = "Stripe meter event submit attempt"
METER_SUBMIT_FAILED = "Stripe meter event submit failed"
METER_SUBMIT_SUCCEEDED = "Stripe meter event submit succeeded"
# Webhook ingest and processing
WEBHOOK_ACCEPTED = "Stripe webhook accepted and queued"
WEBHOOK_DUPLICATE = "Stripe webhook duplicate ignored"
WEBHOOK_PROCESSING_STARTED = "Stripe webhook processing started"
WEBHOOK_EVENT_IGNORED = "Stripe webhook event ignored"
WEBHOOK_PROCESSING_COMPLETED = "Stripe webhook processing completed"
WEBHOOK_ALREADY_PROCESSED = "Stripe webhook processing skipped (already processed)"
# invoice.created adjustments
INVOICE_ADJUSTMENTS_APPLIED = "Stripe invoice.created billing adjustments applied"

# Besides the guide's: operator-facing messages of this package.
FLUSH_SKIPPED_LOCKED = "Stripe usage flush skipped: another flush holds the lock"
FLUSH_DISABLED = "Stripe usage flush skipped: STRIPE_BILLING_ENABLED is not 1"
FLUSH_BLOCKED = "Stripe usage flush blocked by failed contract validation"
FLUSH_CONTRACT_WARNING = "Stripe usage flush contract validation failed; flushing anyway"
CONTRACT_CHECK_FAILED = "Stripe billable_events contract validation failed"
CONTRACT_CHECK_PASSED = "Stripe billable_events contract validation passed"
FLUSH_UNBILLABLE = "Stripe usage flush left unbillable events pending"
FLUSH_HELD = "Stripe usage submission held for reconciliation"
FLUSH_STOPPED = "Stripe usage flush stopped: Stripe refused the account; rows left pending"
FLUSH_METER_STOPPED = "Stripe usage flush stopped a meter: Stripe has no active meter for it"
FLUSH_CUSTOMER_STOPPED = "Stripe usage flush stopped a customer: Stripe has no such customer"
FLUSH_AWAITING_OPERATOR = "Stripe usage submissions failed or held: waiting for an operator"
PERIOD_SYNCED = "Stripe subscription period synced"
PERIOD_SYNC_FAILED = "Stripe subscription period sync failed"
ENTITLEMENTS_REFRESHED = "Stripe entitlements refreshed"
ENTITLEMENT_GRANTED = "Entitlement granted manually"
ENTITLEMENT_REVOKED = "Manual entitlement revoked"
SAAS_CHECKOUT_STARTED = "SaaS upgrade checkout session created"
WEBHOOK_REJECTED = "Stripe webhook rejected"
WEBHOOK_SERVER_ERROR = "Stripe webhook not accepted (server error); Stripe will deliver it again"
WEBHOOK_ENQUEUE_FAILED = "Stripe webhook stored but not queued; the sweep will queue it"
WEBHOOK_PROCESSING_FAILED = "Stripe webhook processing failed"
WEBHOOK_NOT_CLAIMED = "Stripe webhook processing skipped (another worker holds it or it failed)"
WEBHOOK_UNKNOWN_EVENT = "Stripe webhook processing skipped (no stored event)"
WEBHOOK_REQUEUED = "Stripe webhook requeued by the sweep"
WEBHOOK_UNLINKED_CUSTOMER = "Stripe webhook names a customer without a billing account"
ACCOUNT_LINKED = "Stripe checkout linked organization to customer"
SUBSCRIPTION_SYNCED = "Stripe subscription state synced"
INVOICE_PAYMENT_FAILED = "Stripe invoice payment failed"
METER_ERROR_REPORTED = "Stripe meter error report received"
INVOICE_ADJUSTMENTS_SKIPPED = "Stripe invoice.created billing adjustments skipped"
INVOICE_ADJUSTMENT_MISSED = "Stripe invoice adjustment missed: invoice no longer a draft"
INVOICE_ADJUSTMENT_RESOLVED = "Stripe missed invoice adjustment resolved by an operator"
# Meter events Stripe refused asynchronously (meter error reports), and deleted draft invoices.
METER_EVENT_REJECTED = "Stripe meter event rejected asynchronously; outbox row marked rejected"
METER_ERROR_SAMPLE_UNMATCHED = "Stripe meter error sample matches no outbox row"
METER_ERROR_SAMPLE_REQUEUED = "Stripe meter error sample names a row already re-queued"
METER_ERROR_REPORT_DUPLICATE = "Stripe meter error report already recorded; rows left as they are"
SUBMISSIONS_REQUEUED_REJECTED = "Rejected usage submission re-queued with a new identifier"
# Reconciliation (scheduled and by hand) and the smoke check's wait for Stripe's summaries.
RECONCILE_STARTED = "Stripe usage reconciliation started"
RECONCILE_COMPLETED = "Stripe usage reconciliation completed"
RECONCILE_DRIFT = "Stripe usage reconciliation found drift"
RECONCILE_HELD_SETTLED = "Stripe usage held rows settled by reconciliation"
SMOKE_SUMMARIES_WAITED = "Stripe smoke check waited for meter event summaries to settle"
METER_ERROR_REPORT_RECONCILED = "Stripe meter error report reconciled"
METER_ERROR_REPORT_POSTPONED = "Stripe meter error report reconciliation postponed"
# Usage corrections (`billing.usage.correcting`): applied carries organization_id, event_type,
# hour, delta and method (the guide's fields), with correction_id and idempotency_key.
USAGE_CORRECTION_APPLIED = "Stripe usage correction applied"
USAGE_CORRECTION_REJECTED = "Stripe usage correction row rejected"
USAGE_CORRECTION_FAILED = "Stripe usage correction could not be applied"
USAGE_CORRECTION_CANCEL_REFUSED = "Stripe usage correction cancel refused; correcting by event"
USAGE_CORRECTION_HELD = "Stripe usage correction held: a cancel's outcome is unknown"

P = ParamSpec("P")
R = TypeVar("R")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "billing_log_context", default=None
)

# Attributes every LogRecord has; anything else on a record came from `extra=` or `bind()`.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    return logging.getLogger(name)


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add fields (e.g. organization_id) to every record logged inside the block."""
    token = bind_fields(**fields)
    try:
        yield
    finally:
        unbind_fields(token)


def bind_fields(**fields: Any) -> contextvars.Token[dict[str, Any] | None]:
    """`bind()` for callers with separate start and end hooks (Celery's task_prerun/postrun)."""
    return _context.set({**(_context.get() or {}), **fields})


def unbind_fields(token: contextvars.Token[dict[str, Any] | None]) -> None:
    _context.reset(token)


def bound(name: str) -> Any:
    """A field bound by the innermost `bind()` (e.g. the running task's id), or None."""
    return (_context.get() or {}).get(name)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    """For a person at a terminal: the message, then its fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}
        if extras:
            line += " " + " ".join(f"{key}={value}" for key, value in extras.items())
        return line


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "timestamp", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def carry_context(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` with this thread's bound fields, for work handed to a thread pool (the submit lanes)."""
    fields = _context.get()

    @functools.wraps(fn)
    def with_fields(*args: P.args, **kwargs: P.kwargs) -> R:
        token = _context.set(fields)
        try:
            return fn(*args, **kwargs)
        finally:
            _context.reset(token)

    return with_fields


def configure_logging(
    level: str = "INFO",
    fmt: str = "auto",
    stream: Any = None,
    *,
    others_level: int | str = logging.WARNING,
) -> None:
    """The one logging set-up of every entry point (CLI, Celery worker and beat).

    One handler on the root logger writes every record to `stream` (stderr) as a JSON line (text
    on a TTY, or as `fmt` says), so Celery's own lines share the format of billing's. The
    `billing` loggers log at `level`; other libraries at `others_level` (a worker's --loglevel).
    stripe-python logs one INFO line per request: shown only when `level` is DEBUG.
    """
    stream = stream or sys.stderr
    use_text = fmt == "text" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        if use_text
        else json_formatter()
    )
    handler.addFilter(ContextFilter())
    handler._billing_handler = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for logger in (root, get_logger()):
        for old in list(logger.handlers):
            if getattr(old, "_billing_handler", False):
                logger.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(others_level)
    billing = get_logger()
    billing.setLevel(level)
    billing.propagate = True
    logging.captureWarnings(True)  # a library's warnings become lines of the same format
    logging.getLogger("stripe").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


class LaneLog:
    """The lanes' per-row log lines, written by one thread of their own.

    Lanes that each wrote their own lines queued on the log handler's lock (held across the
    write), and that wait cost more than the lines themselves (docs/performance.md). Here a lane
    only makes the record (its time, fields and bound context are the lane's) and queues it; the
    writer hands them to the logger in the order they came, so each row's lines keep their order
    and messages, and `flush()` waits until every queued line is out."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._queue: queue.SimpleQueue[logging.LogRecord | threading.Event | None] = (
            queue.SimpleQueue()
        )
        self._writer = threading.Thread(target=self._write, name="meter-submit-log", daemon=True)
        self._writer.start()

    def info(self, message: str, fields: dict[str, Any]) -> None:
        self._put(logging.INFO, message, fields)

    def warning(self, message: str, fields: dict[str, Any]) -> None:
        self._put(logging.WARNING, message, fields)

    def error(self, message: str, fields: dict[str, Any]) -> None:
        self._put(logging.ERROR, message, fields)

    def _put(self, level: int, message: str, fields: dict[str, Any]) -> None:
        if not self.logger.isEnabledFor(level):
            return
        # The caller's line (info/warning/error → _put), read off its frame: `findCaller` walks
        # and normalizes the stack on every call, a few percent of a lane's CPU per row.
        code, line = (caller := sys._getframe(2)).f_code, caller.f_lineno
        record = self.logger.makeRecord(
            self.logger.name, level, code.co_filename, line, message, (), None, code.co_name, fields
        )
        ContextFilter().filter(record)  # the lane's bound fields, not the writer's
        self._queue.put(record)

    def flush(self) -> None:
        written = threading.Event()
        self._queue.put(written)
        written.wait()

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join()

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
            else:
                self.logger.handle(item)
