"""The durable record of hourly flush runs: the `flush_hourly` row of `ops_records`.

`flask billing status` and the scrape-time gauges read it, so the last run and the last successful
one are known whichever process ran them (a Celery worker, cron's `flush_hourly`), with either lock
backend, and survive restarts. Beside them two counts of runs in a row: skipped by the lock (three
mean a stuck lock) and refused because Redis, the lock's backend, was unreachable (a run that
cannot reach Redis can still write here).
A record that cannot be written is logged and never fails the flush it describes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from billing import ops_records
from billing.errors import error_line, one_line
from billing.usage.result import FlushResult

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
    "corrections_applied",
    "corrections_waiting",
    "corrections_held",
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
class FlushHistory:
    last_run: dict[str, Any] | None = None
    last_success: dict[str, Any] | None = None
    consecutive_lock_skips: int = 0
    consecutive_lock_unavailable: int = 0

    @classmethod
    def from_payload(cls, payload: dict[str, Any] | None) -> FlushHistory:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (payload or {}).items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def after(self, outcome: str, entry: dict[str, Any]) -> FlushHistory:
        """The history once a run with `outcome` (described by `entry`) is recorded."""
        skips, unavailable = self.consecutive_lock_skips, self.consecutive_lock_unavailable
        if outcome == SKIPPED_LOCK:
            skips, unavailable = skips + 1, 0  # Redis answered
        elif outcome == LOCK_UNAVAILABLE:
            unavailable += 1  # and the skips wait: Redis down says nothing about the holder
        else:
            skips, unavailable = 0, 0
        success = entry if outcome == OK else self.last_success
        return FlushHistory(entry, success, skips, unavailable)


def record_run(
    session_factory: sessionmaker[Session],
    outcome: str,
    result: FlushResult | None = None,
    *,
    error: BaseException | None = None,
    now: datetime | None = None,
) -> bool:
    entry = run_entry(outcome, result, error=error, now=now)
    return ops_records.update_record(
        session_factory,
        ops_records.FLUSH,
        lambda current: FlushHistory.from_payload(current).after(outcome, entry).to_dict(),
    )


def run_entry(
    outcome: str,
    result: FlushResult | None = None,
    *,
    error: BaseException | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """One run as status shows it; every error in one line (`billing.errors`)."""
    entry: dict[str, Any] = {"at": (now or datetime.now(UTC)).isoformat(), "result": outcome}
    if result is not None:
        entry.update({name: getattr(result, name, None) for name in _SUMMARY_FIELDS})
        for name in ("last_error", "stop_error"):
            if entry[name]:
                entry[name] = one_line(entry[name])
    if error is not None:
        entry["error"] = describe_run_error(error)
    return entry


def describe_run_error(error: BaseException) -> str:
    """The exception that ended a run; its class named unless the line names the driver's."""
    line = error_line(error)
    return line if isinstance(error, SQLAlchemyError) else f"{type(error).__name__}: {line}"


def timestamp_of(entry: dict[str, Any] | None) -> float | None:
    return datetime.fromisoformat(entry["at"]).timestamp() if entry else None
