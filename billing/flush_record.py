"""The durable record of hourly flush runs, kept in Redis beside the lock.

`flask billing status` and the scrape-time gauges read it, so the last successful flush is known
whichever process ran it (a Celery worker, cron's `flush_hourly`) and survives restarts. Keys hang
off the lock key: `<lock key>:last-run`, `:last-success` (JSON) and `:lock-skips` (runs skipped by
the lock since the last run that held it: three in a row means a stuck lock).
A record that cannot be written is logged and never fails the flush it describes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis

from billing.logs import get_logger

if TYPE_CHECKING:
    from billing.config import Settings
    from billing.flush_result import FlushResult

log = get_logger("billing.flush_record")

# Outcomes of one hourly run (`billing_flush_runs_total{result=…}` uses the same words).
OK = "ok"
# The run finished but left its own work undone: rows pending or stopped, a row refused, the lock
# lost. Rows that earlier runs left failed or held (`awaiting_operator`) make the CLI exit 1 but
# not this outcome: they have their own gauge and alerts, and the flush itself is healthy.
FAILED = "failed"
ERROR = "error"  # the run raised (database down, Stripe unreachable past retries, …)
SKIPPED_LOCK = "skipped_lock"
BLOCKED_CONTRACT = "blocked_contract"
LOCK_UNAVAILABLE = "lock_unavailable"
DISABLED = "disabled"

_SUMMARY_FIELDS = (
    "events_claimed",
    "batches",
    "submissions_sent",
    "submissions_failed",
    "submissions_pending",
    "submissions_held",
    "submissions_stopped",
    "stop_error",
    "awaiting_operator",
    "billed_value",
    "duration_seconds",
    "last_error",
)


def outcome_of(result: FlushResult) -> str:
    if not result.enabled:
        return DISABLED
    if result.skipped:
        return SKIPPED_LOCK
    if result.blocked:
        return BLOCKED_CONTRACT
    # The result's own verdict, leaving out rows that earlier runs left for an operator.
    undone = not dataclasses.replace(result, awaiting_operator={}).ok
    return FAILED if undone else OK


@dataclass(frozen=True)
class FlushRecordKeys:
    last_run: str
    last_success: str
    lock_skips: str

    @classmethod
    def for_settings(cls, settings: Settings) -> FlushRecordKeys:
        base = settings.flush_lock_key
        return cls(f"{base}:last-run", f"{base}:last-success", f"{base}:lock-skips")


def record_run(
    client: redis.Redis,
    settings: Settings,
    outcome: str,
    result: FlushResult | None = None,
    *,
    error: str | None = None,
    now: datetime | None = None,
) -> None:
    keys = FlushRecordKeys.for_settings(settings)
    entry: dict[str, Any] = {"at": (now or datetime.now(UTC)).isoformat(), "result": outcome}
    if result is not None:
        entry.update({name: getattr(result, name, None) for name in _SUMMARY_FIELDS})
    if error is not None:
        entry["error"] = error
    payload = json.dumps(entry, sort_keys=True, default=str)
    try:
        with client.pipeline(transaction=True) as pipe:
            pipe.set(keys.last_run, payload)
            if outcome == OK:
                pipe.set(keys.last_success, payload)
            if outcome == SKIPPED_LOCK:
                pipe.incr(keys.lock_skips)
            elif outcome != LOCK_UNAVAILABLE:
                pipe.delete(keys.lock_skips)
            pipe.execute()
    except redis.RedisError as failure:
        log.warning(
            "Stripe usage flush run not recorded", extra={"error": str(failure), "result": outcome}
        )


@dataclass(frozen=True)
class FlushHistory:
    last_run: dict[str, Any] | None
    last_success: dict[str, Any] | None
    consecutive_lock_skips: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_run": self.last_run,
            "last_success": self.last_success,
            "consecutive_lock_skips": self.consecutive_lock_skips,
        }


def read_history(client: redis.Redis, settings: Settings) -> FlushHistory:
    keys = FlushRecordKeys.for_settings(settings)
    last_run, last_success, skips = client.mget(keys.last_run, keys.last_success, keys.lock_skips)
    return FlushHistory(
        last_run=json.loads(last_run) if last_run else None,
        last_success=json.loads(last_success) if last_success else None,
        consecutive_lock_skips=int(skips or 0),
    )


def timestamp_of(entry: dict[str, Any] | None) -> float | None:
    return datetime.fromisoformat(entry["at"]).timestamp() if entry else None
