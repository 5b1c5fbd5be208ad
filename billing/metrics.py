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

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

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

from billing.errors import error_line

if TYPE_CHECKING:
    from billing.runtime import Runtime
    from billing.usage.result import FlushResult

log = logging.getLogger("billing.metrics")

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


def observe_flush(result: FlushResult, outcome: str, meters: Mapping[str, str]) -> None:
    """Count one hourly flush run (the service seam calls this once per run)."""
    FLUSH_RUNS.labels(result=outcome).inc()
    if outcome not in ("ok", "failed"):  # no work done (skipped, blocked) or none measured
        return
    FLUSH_DURATION.observe(result.duration_seconds)
    EVENTS_CLAIMED.inc(result.events_claimed)
    METER_EVENTS_SENT.inc(result.submissions_sent)
    METER_EVENTS_FAILED.inc(result.submissions_failed)
    for event_type, units in result.billed_value.items():
        UNITS_BILLED.labels(meter=meters.get(event_type, event_type)).inc(units)


def observe_contract_validation(failed_checks: Iterable[str]) -> None:
    failed = list(failed_checks)
    CONTRACT_VALIDATIONS.labels(result="failed" if failed else "passed").inc()
    for check in failed:
        CONTRACT_CHECK_FAILURES.labels(check=check).inc()


# Scrape-time gauges ---------------------------------------------------------------------------


class StateCollector(Collector):
    """Gauges computed from the database and Redis on each scrape (`billing.ops_state`)."""

    def __init__(self, runtime: Callable[[], Runtime]) -> None:
        self._runtime = runtime

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from billing.ops.state import read_state

        up = GaugeMetricFamily(
            "billing_state_up", "1 when the database and Redis answered this scrape."
        )
        try:
            state = read_state(self._runtime())
        except Exception as error:  # a scrape must answer even when a backend is down
            log.warning("billing state scrape failed", extra={"error": error_line(error)})
            up.add_metric([], 0)
            yield up
            return
        if state.lock_error:  # the database's gauges still come: the lock alerts read them
            log.warning("billing state scrape failed", extra={"error": state.lock_error})
        up.add_metric([], 0 if state.lock_error else 1)
        yield up
        yield from state.gauges()


def registry_for_scrape(runtime: Callable[[], Runtime], *, with_state: bool) -> CollectorRegistry:
    """Counters of every process (multiprocess mode) or of this one, plus the state gauges."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    if with_state:
        registry.register(StateCollector(runtime))
    return registry


def exposition(runtime: Callable[[], Runtime], *, with_state: bool = True) -> bytes:
    return generate_latest(registry_for_scrape(runtime, with_state=with_state))


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
