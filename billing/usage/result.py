"""What a flush run reports: the result every entry point returns, and the transient failure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from billing.errors import OperatorError


class TransientFlushError(RuntimeError, OperatorError):
    """The flush left submissions pending after transient Stripe errors: run it again."""

    def __init__(self, result: FlushResult) -> None:
        super().__init__(
            f"{result.submissions_pending} usage submission(s) still pending after transient "
            f"Stripe errors: {result.last_error}"
        )
        self.result = result


# What a pass did (added up over a run's passes); every other field says how things stand.
RUN_COUNTERS = (
    "events_claimed",
    "batches",
    "submissions_sent",
    "submissions_already_delivered",
    "submissions_failed",
    "submissions_held",
    "corrections_applied",
)


@dataclass
class FlushResult:
    enabled: bool = True
    skipped: bool = False
    blocked: bool = False
    events_claimed: int = 0
    batches: int = 0
    submissions_sent: int = 0
    submissions_already_delivered: int = 0
    submissions_failed: int = 0
    submissions_pending: int = 0
    submissions_held: int = 0
    # Left pending because an error about the account, a meter or a customer stopped them.
    submissions_stopped: int = 0
    stop_error: str | None = None  # the account-level error that stopped the whole run
    stopped_meters: dict[str, str] = field(default_factory=dict)  # event name -> error
    stopped_customers: dict[str, str] = field(default_factory=dict)  # customer id -> error
    # Current counts (this run's scope), not only what this run touched: they wait for an operator.
    awaiting_operator: dict[str, int] = field(default_factory=dict)
    billed_value: dict[str, int] = field(default_factory=dict)
    unbillable: dict[str, int] = field(default_factory=dict)
    contract_failures: list[dict[str, Any]] = field(default_factory=list)
    last_error: str | None = None
    lock_lost: bool = False
    duration_seconds: float = 0.0
    # Usage corrections (`billing.usage.correcting`): applied by this run; not finished after it
    # (requested, cancelling, sending); held for reconciliation (a cancel's outcome unknown).
    corrections_applied: int = 0
    corrections_waiting: int = 0
    corrections_held: int = 0

    @property
    def ok(self) -> bool:
        """False when the run was blocked or stopped, left work pending, Stripe refused something,
        or failed, held or rejected rows wait for an operator (from any run)."""
        return not (
            self.blocked
            or self.submissions_pending
            or self.submissions_failed
            or self.submissions_stopped
            or self.stop_error
            or self.stopped_meters
            or self.stopped_customers
            or self.lock_lost
            or any(self.awaiting_operator.values())
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    @classmethod
    def of_run(cls, passes: Sequence[FlushResult]) -> FlushResult:
        """One result for a run of several passes (`flush_hourly`): what the passes did, added up
        (a row claimed and left pending by the first pass and sent by the second is claimed once
        and sent once), and how things stand after the last one (pending, stops, rows waiting
        for an operator, unbillable rows)."""
        last = passes[-1]
        billed: dict[str, int] = {}
        for result in passes:
            for event_type, value in result.billed_value.items():
                billed[event_type] = billed.get(event_type, 0) + value
        return replace(
            last,
            **{name: sum(getattr(r, name) for r in passes) for name in RUN_COUNTERS},
            billed_value=billed,
            duration_seconds=round(sum(r.duration_seconds for r in passes), 3),
        )

    def raise_if_transient(self) -> FlushResult:
        """Another pass may finish the work, unless the account itself was refused."""
        if (self.submissions_pending or self.lock_lost) and not self.stop_error:
            raise TransientFlushError(self)
        return self
