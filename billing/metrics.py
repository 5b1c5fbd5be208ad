"""Prometheus metrics (prometheus-client), all named `billing_…`.

Two kinds:
- Counters and a histogram kept by the process that did the work (flush, webhooks, contract
  checks). With `PROMETHEUS_MULTIPROC_DIR` set (gunicorn workers, Celery prefork children) each
  process writes its own mmap file there and a scrape sums them all, so no child's counts are
  lost when it exits; the directory must be empty when the service starts (systemd's
  `RuntimeDirectory=` gives that) and one per service, or two services count each other's work.
- Gauges read from the database and Redis at scrape time by the web app (`StateCollector`): the
  backlog, the outbox and dead letters by status, the lock, and the run records of the database
  (`billing.ops_records`): the last flush runs, runs in a row skipped by the lock or refused with
  Redis down, the last contract validation. Nothing in-process can go stale or be lost by a
  restart, and runs from cron count as well: alerts on runs read these, not the counters of a
  CLI process, which die with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class FlushCounts(Protocol):
    """What a flush run reports that the counters add up (`billing.usage.result.FlushResult`)."""

    duration_seconds: float
    events_claimed: int
    submissions_sent: int
    submissions_failed: int
    billed_value: dict[str, int]


CONTENT_TYPE = CONTENT_TYPE_LATEST

# Flush ----------------------------------------------------------------------------------------
FLUSH_RUNS = Counter(
    "billing_flush_runs_total",
    "Hourly flush runs by outcome: ok, failed, error, skipped_lock, blocked_contract, "
    "lock_unavailable, disabled.",
    ["result"],
)
FLUSH_DURATION = Histogram(
    "billing_flush_duration_seconds",
    "Wall time of flush runs that did work.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3300, float("inf")),
)
EVENTS_CLAIMED = Counter("billing_events_claimed_total", "billable_events rows claimed by flushes.")
UNITS_BILLED = Counter(
    "billing_units_billed_total", "Units Stripe accepted, per meter event name.", ["meter"]
)
METER_EVENTS_SENT = Counter(
    "billing_meter_events_sent_total", "Meter events Stripe accepted (or already had)."
)
METER_EVENTS_FAILED = Counter(
    "billing_meter_events_failed_total", "Meter events Stripe refused for good (rows `failed`)."
)
CONTRACT_VALIDATIONS = Counter(
    "billing_contract_validations_total",
    "Scheduled contract validations by result (the alert reads the record: "
    "billing_contract_last_validation_failed_checks).",
    ["result"],
)
CONTRACT_CHECK_FAILURES = Counter(
    "billing_contract_check_failures_total", "Failed contract checks, per check.", ["check"]
)

# Webhooks -------------------------------------------------------------------------------------
WEBHOOKS_RECEIVED = Counter("billing_webhooks_received_total", "Verified webhook deliveries.")
WEBHOOKS_DUPLICATE = Counter(
    "billing_webhooks_duplicate_total", "Deliveries of an event id already stored."
)
WEBHOOKS_REJECTED = Counter(
    "billing_webhooks_rejected_total", "Deliveries refused, by reason.", ["reason"]
)
WEBHOOKS_PROCESSED = Counter(
    "billing_webhooks_processed_total", "Webhook events processed, by event type.", ["type"]
)
WEBHOOKS_FAILED = Counter(
    "billing_webhooks_failed_total",
    "Webhook processing attempts that raised, by event type.",
    ["type"],
)

# Meter error reports ---------------------------------------------------------------------------
METER_EVENTS_REJECTED = Counter(
    "billing_meter_events_rejected_total",
    "Outbox rows marked rejected: Stripe accepted the meter event, then refused it "
    "asynchronously (a meter error report), by Stripe's error code.",
    ["code"],
)

# Meter event APIs (v1 calls, the v2 stream) ----------------------------------------------------
METER_EVENT_CALLS = Counter(
    "billing_meter_event_calls_total",
    "Meter event requests sent to Stripe, by API (v1: one event each; v2: a stream request).",
    ["api"],
)
METER_EVENT_EVENTS = Counter(
    "billing_meter_event_events_total", "Meter events carried by those requests, by API.", ["api"]
)
METER_EVENT_RATE_LIMITED = Counter(
    "billing_meter_event_rate_limited_total",
    "Meter event requests Stripe answered 429 (rate limited; retried within the call budget), "
    "by API.",
    ["api"],
)
METER_EVENT_SESSION_RENEWALS = Counter(
    "billing_meter_event_session_renewals_total",
    "v2 meter event sessions created (the first and every renewal before or after expiry).",
)


def observe_flush(result: FlushCounts, outcome: str, meters: Mapping[str, str]) -> None:
    """Count one hourly flush run (the service seam calls this once per run)."""
    FLUSH_RUNS.labels(result=outcome).inc()
    if outcome not in ("ok", "failed"):  # no work done (skipped, blocked) or none measured
        return
    FLUSH_DURATION.observe(result.duration_seconds)
    EVENTS_CLAIMED.inc(result.events_claimed)
    METER_EVENTS_SENT.inc(result.submissions_sent)
    METER_EVENTS_FAILED.inc(result.submissions_failed)
    for event_type, units in result.billed_value.items():
        # Net of the run's usage corrections, which may retract more than it billed: a counter
        # only grows (the corrections have their own, billing_usage_corrections_applied_total).
        UNITS_BILLED.labels(meter=meters.get(event_type, event_type)).inc(max(units, 0))


def observe_contract_validation(failed_checks: Iterable[str]) -> None:
    failed = list(failed_checks)
    CONTRACT_VALIDATIONS.labels(result="failed" if failed else "passed").inc()
    for check in failed:
        CONTRACT_CHECK_FAILURES.labels(check=check).inc()


@dataclass(frozen=True)
class StateGauge:
    """A gauge computed at scrape time (not kept in a process): its name and meaning, here with
    every other metric's; `billing.ops.state` gives the values."""

    name: str
    documentation: str
    label: str | None = None

    def family(self, value: float | Mapping[str, float]) -> GaugeMetricFamily:
        """The gauge with `value`, or with one sample per label value of a mapping."""
        if self.label is None:
            assert not isinstance(value, Mapping)
            return GaugeMetricFamily(self.name, self.documentation, value=value)
        assert isinstance(value, Mapping)
        family = GaugeMetricFamily(self.name, self.documentation, labels=[self.label])
        for key, sample in sorted(value.items()):
            family.add_metric([key], sample)
        return family


# Scrape-time gauges: values read from the database and Redis by `billing.ops.state` --------

FLUSH_LAST_RUN_TIMESTAMP_SECONDS = StateGauge(
    "billing_flush_last_run_timestamp_seconds",
    "When the last hourly flush run (any outcome) finished.",
)
FLUSH_LAST_SUCCESS_TIMESTAMP_SECONDS = StateGauge(
    "billing_flush_last_success_timestamp_seconds",
    "When the last hourly flush run (ok) finished.",
)
OLDEST_UNBILLED_EVENT_AGE_SECONDS = StateGauge(
    "billing_oldest_unbilled_event_age_seconds",
    "Age of the oldest usage not yet accepted by Stripe (unclaimed, pending, held or "
    "failed); 0 when none.",
)
UNCLAIMED_EVENTS = StateGauge(
    "billing_unclaimed_events",
    "Pending billable_events rows: claimed by no flush, dismissed by no operator.",
)
WEBHOOK_DEAD_LETTERS = StateGauge(
    "billing_webhook_dead_letters",
    "Webhook events that failed their last retry (status failed).",
)
INVOICE_ADJUSTMENTS_MISSED = StateGauge(
    "billing_invoice_adjustments_missed",
    "Minimum-commitment top-ups missed because the invoice was finalized first, waiting "
    "for an operator (carry-over or waive).",
)
FLUSH_LOCK_HELD_SECONDS = StateGauge(
    "billing_flush_lock_held_seconds",
    "How long the current holder has held the flush lock; 0 when free.",
)
FLUSH_CONSECUTIVE_LOCK_SKIPS = StateGauge(
    "billing_flush_consecutive_lock_skips",
    "Hourly runs in a row skipped because another run held the lock.",
)
FLUSH_CONSECUTIVE_LOCK_UNAVAILABLE = StateGauge(
    "billing_flush_consecutive_lock_unavailable",
    "Hourly runs in a row that refused to run because Redis (the flush lock) was "
    "unreachable; 0 once a run reaches it.",
)
CONTRACT_LAST_VALIDATION_TIMESTAMP_SECONDS = StateGauge(
    "billing_contract_last_validation_timestamp_seconds",
    "When the last billable_events contract validation (scheduled or CLI) ran.",
)
CONTRACT_LAST_VALIDATION_FAILED_CHECKS = StateGauge(
    "billing_contract_last_validation_failed_checks",
    "Checks the last billable_events contract validation failed; 0 when it passed.",
)
UNBILLABLE_EVENTS = StateGauge(
    "billing_unbillable_events",
    "Pending billable_events rows the flush sets aside (never sends) until fixed or "
    "dismissed, by reason.",
    label="reason",
)
OUTBOX_ROWS = StateGauge(
    "billing_outbox_rows",
    "Outbox (usage_submissions) rows not yet sent, by status.",
    label="status",
)
WEBHOOK_EVENTS = StateGauge(
    "billing_webhook_events",
    "Webhook events not yet processed or ignored, by status.",
    label="status",
)

# Reconciliation: from its run record (`ops_records.RECONCILE`), so cron's runs count too.
RECONCILE_LAST_RUN_TIMESTAMP_SECONDS = StateGauge(
    "billing_reconcile_last_run_timestamp_seconds",
    "When the last scheduled reconciliation (beat's hourly task, or `flask billing reconcile` "
    "without --since/--until) finished.",
)
RECONCILE_GROUPS = StateGauge(
    "billing_reconcile_groups",
    "Groups (customer, meter, hour) of the last scheduled reconciliation, by status: match, "
    "drift, in_flight, unknown, not_settled.",
    label="status",
)


STATE_UP = StateGauge("billing_state_up", "1 when the database and Redis answered this scrape.")

# Usage corrections -----------------------------------------------------------------------------
USAGE_CORRECTIONS_APPLIED = Counter(
    "billing_usage_corrections_applied_total",
    "Usage corrections applied, by method: cancel_restate, correcting_event, credit.",
    ["method"],
)
USAGE_CORRECTIONS = StateGauge(
    "billing_usage_corrections",
    "Usage corrections by status (requested, cancelling, sending, held: not finished; failed: "
    "never applied), and upstream correction rows rejected (status rejected).",
    label="status",
)


def observe_correction_applied(method: str) -> None:
    USAGE_CORRECTIONS_APPLIED.labels(method=method).inc()


def registry_for_scrape(state: Collector | None = None) -> CollectorRegistry:
    """Counters of every process (multiprocess mode) or of this one, plus `state`'s gauges."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    if state is not None:
        registry.register(state)
    return registry


def exposition(state: Collector | None = None) -> bytes:
    return generate_latest(registry_for_scrape(state))


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (its counters stay counted)."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)


class _Forward(Collector):
    """This process's default registry, inside a scrape registry of our own."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterable[object]:  # type: ignore[override]
        return self._source.collect()
