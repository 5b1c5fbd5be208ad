"""The hourly usage flush: claim → aggregate → outbox → submit, batch after batch.

Exactly once, whatever crashes: claiming (`usage.claiming`) is one transaction per batch that
turns events into outbox rows with fixed Stripe identifiers; submitting (`usage.submitting`)
sends pending outbox rows and repairs a crash by re-sending them (Stripe answers "already exists").

The two overlap: batch N+1 is claimed while batch N is sent, so database work and Stripe calls run
at the same time. Batches are sent one after the other (one batch in flight), so a customer's
meter never has two calls in flight, and memory holds at most two batches' outbox rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from billing import logs
from billing.checks.report import GateVerdict
from billing.config import Settings
from billing.models import utcnow
from billing.stripe_gateway import StripeGateway
from billing.usage import retry_policy
from billing.usage.claiming import ClaimedBatch, Claimer
from billing.usage.correcting import apply_corrections
from billing.usage.outbox import awaiting_operator_counts
from billing.usage.result import FlushResult, TransientFlushError
from billing.usage.submitting import Stops, Submitter

__all__ = ["FlushResult", "TransientFlushError", "UsageFlush", "flush_usage"]

log = logs.get_logger("billing.usage")

# Sends every pending row once the run has claimed (`usage.fanout.Coordinator`).
FanOut = Callable[[Submitter], None]


class UsageFlush:
    """One flush run; tasks and CLI commands reach it through `flush_usage`."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        gateway: StripeGateway,
        *,
        organization_id: int | None = None,
        clock: Callable[[], datetime] = utcnow,
        lost_lock: Callable[[], bool] = lambda: False,
        on_progress: Callable[[FlushResult], None] | None = None,
        call_attempts: int = retry_policy.CALLS_PER_ROW_PER_RUN,
        fan_out: FanOut | None = None,
    ) -> None:
        self.settings = settings
        self.fan_out = fan_out
        self.sessions = session_factory
        self.organization_id = organization_id
        self.clock = clock
        self.lost_lock = lost_lock
        self.on_progress = on_progress
        self.stops = Stops()
        self.result = FlushResult()
        self.claimer = Claimer(
            settings, session_factory, self.stops, organization_id=organization_id, clock=clock
        )
        self.submitter = Submitter(
            settings,
            session_factory,
            gateway,
            self.stops,
            self.result,
            organization_id=organization_id,
            clock=clock,
            call_attempts=call_attempts,
        )

    # The pass ---------------------------------------------------------------------------------

    def run(self) -> FlushResult:
        """The pass after `flush_usage` logged its start and passed the contract gate."""
        started = time.monotonic()
        fields = self._scope_fields()
        try:
            self.submitter.check_before_claiming()
            self.submitter.hold_stale_submissions()
            if self.fan_out is not None:
                self._claim_only()
                self.fan_out(self.submitter)  # every pending row, an earlier run's too
            else:
                self._send_pending()
                self._claim_and_send(fields)
            apply_corrections(self.submitter)  # after the usage: a correction sees what was sent
        finally:
            self.submitter.close()
        self.result.unbillable = self.claimer.count_unbillable()
        if self.result.unbillable:
            log.warning(
                logs.FLUSH_UNBILLABLE, extra={**fields, "unbillable": self.result.unbillable}
            )
        self._report_stops()
        self._count_awaiting_operator()
        self.result.lock_lost = self.lost_lock()
        self.result.duration_seconds = round(time.monotonic() - started, 3)
        if not self.result.events_claimed and not self._sent_anything():
            log.info(logs.FLUSH_NO_PENDING, extra={**fields, "unbillable": self.result.unbillable})
        log.info(logs.FLUSH_COMPLETED, extra={**fields, **self._summary_fields()})
        return self.result

    def _send_pending(self) -> None:
        """An earlier run's pending rows are re-sent first."""
        pending = self.submitter.pending_submission_ids()
        page = self.settings.flush_batch_size
        for start in range(0, len(pending), page):
            if self.stops.run.is_set():
                break
            self._submit(pending[start : start + page])

    def _claim_only(self) -> None:
        """Claim every batch and send nothing: the fan-out sends them all afterwards."""
        while not self._should_stop():
            batch = self.claimer.claim_batch()
            if batch is None:
                break
            if batch.submission_ids:
                self._count_batch(batch)
                if self.on_progress:
                    self.on_progress(self.result)

    def _count_batch(self, batch: ClaimedBatch) -> None:
        self.result.batches += 1
        self.result.events_claimed += batch.events

    def _claim_and_send(self, fields: dict[str, Any]) -> None:
        """Claim batch N+1 while batch N is being sent (one sender thread: one batch in flight)."""
        in_flight: Future[None] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flush-batches") as sender:
            send = logs.carry_context(self._send_batch)
            while not self._should_stop():
                batch = self.claimer.claim_batch()
                if in_flight is not None:
                    in_flight.result()  # re-raises what the sender hit
                    in_flight = None
                if batch is None:
                    break
                if not batch.submission_ids:
                    continue  # rows without a customer, for instance: the cursor moved on
                self._count_batch(batch)
                batch_fields = {
                    **fields,
                    "batch": self.result.batches,
                    "events": batch.events,
                    "submissions": len(batch.submission_ids),
                }
                in_flight = sender.submit(send, batch, batch_fields)
            if in_flight is not None:
                in_flight.result()

    def _send_batch(self, batch: ClaimedBatch, batch_fields: dict[str, Any]) -> None:
        log.info(logs.FLUSH_BATCH_STARTED, extra=batch_fields)
        self._submit(batch.submission_ids)
        log.info(logs.FLUSH_BATCH_COMPLETED, extra=batch_fields)
        if self.on_progress:
            self.on_progress(self.result)

    def _submit(self, submission_ids: Sequence[int]) -> None:
        self.submitter.submit(submission_ids)

    def _should_stop(self) -> bool:
        # Losing the lock means another flush may be running: stop claiming (it is still safe).
        return self.stops.run.is_set() or self.lost_lock()

    def _sent_anything(self) -> bool:
        r = self.result
        return bool(r.submissions_sent or r.submissions_failed or r.submissions_pending)

    def _scope_fields(self) -> dict[str, Any]:
        return scope_fields(self.organization_id)

    def _summary_fields(self) -> dict[str, Any]:
        r = self.result
        return {
            "events_claimed": r.events_claimed,
            "batches": r.batches,
            "submissions_sent": r.submissions_sent,
            "submissions_failed": r.submissions_failed,
            "submissions_pending": r.submissions_pending,
            "submissions_held": r.submissions_held,
            "submissions_stopped": r.submissions_stopped,
            "awaiting_operator": r.awaiting_operator,
            "billed_value": r.billed_value,
            "unbillable": r.unbillable,
            "duration_ms": int(r.duration_seconds * 1000),
        }

    # Claiming ---------------------------------------------------------------------------------

    # Reporting --------------------------------------------------------------------------------

    def _report_stops(self) -> None:
        stops, result = self.stops, self.result
        result.stop_error = stops.run_error
        result.stopped_meters = dict(stops.meters)
        result.stopped_customers = dict(stops.customers)
        fields = self._scope_fields()
        if stops.run_error:
            log.error(logs.FLUSH_STOPPED, extra={**fields, "error": stops.run_error})
        for event_name, error in stops.meters.items():
            log.error(
                logs.FLUSH_METER_STOPPED, extra={**fields, "event_name": event_name, "error": error}
            )
        for customer, error in stops.customers.items():
            log.error(
                logs.FLUSH_CUSTOMER_STOPPED,
                extra={**fields, "stripe_customer_id": customer, "error": error},
            )

    def _count_awaiting_operator(self) -> None:
        """Failed and held rows from any run stay in every result until an operator acts."""
        counts = awaiting_operator_counts(self.sessions, self.organization_id)
        self.result.awaiting_operator = counts
        if any(counts.values()):
            log.error(logs.FLUSH_AWAITING_OPERATOR, extra={**self._scope_fields(), **counts})


def scope_fields(organization_id: int | None) -> dict[str, Any]:
    return {} if organization_id is None else {"organization_id": organization_id}


def flush_usage(
    settings: Settings,
    session_factory: sessionmaker[Session],
    gateway_factory: Callable[[], StripeGateway],
    *,
    organization_id: int | None = None,
    clock: Callable[[], datetime] = utcnow,
    lost_lock: Callable[[], bool] = lambda: False,
    contract_gate: Callable[[], GateVerdict] | None = None,
    on_progress: Callable[[FlushResult], None] | None = None,
    call_attempts: int = retry_policy.CALLS_PER_ROW_PER_RUN,
    fan_out: FanOut | None = None,
) -> FlushResult:
    """One flush pass (no lock): the service function every entry point ends in.

    `call_attempts` is this pass's share of the run's calls per row (`usage.retry_policy`);
    `fan_out` sends the pending rows once all are claimed (`usage.fanout`), instead of sending
    each batch in this process while the next is claimed."""
    if not settings.billing_enabled:
        log.warning(logs.FLUSH_DISABLED)
        return FlushResult(enabled=False)
    fields = scope_fields(organization_id)
    # Before the gate: its warning or block belongs to this run, and reads so in the logs.
    log.info(logs.FLUSH_STARTED, extra=fields)
    # The gate (billing.checks.validation) decides whether checks run and whether a failure blocks.
    verdict = contract_gate() if contract_gate else GateVerdict([], blocks=False)
    failures = verdict.failures
    if failures:
        failed = {**fields, "failed_checks": [f["check"] for f in failures]}
        if verdict.blocks:
            log.error(logs.FLUSH_BLOCKED, extra=failed)
            return FlushResult(blocked=True, contract_failures=failures)
        log.warning(logs.FLUSH_CONTRACT_WARNING, extra=failed)
    flush = UsageFlush(
        settings,
        session_factory,
        gateway_factory(),
        organization_id=organization_id,
        clock=clock,
        lost_lock=lost_lock,
        on_progress=on_progress,
        call_attempts=call_attempts,
        fan_out=fan_out,
    )
    result = flush.run()
    result.contract_failures = failures
    return result
