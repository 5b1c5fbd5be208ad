"""`flask billing smoke_org`: one organization end to end against Stripe test mode.

Steps: test-mode guard → billing enabled → billing account → Stripe customer → subscription →
period refresh → contract → flush of this organization only → meter event summaries, which must
hold exactly what our outbox says was sent to this customer over the current period and every
hour this run sent (usage may predate the period: a fresh subscription). Nothing to compare is a
failure, not a pass: `Stripe 0 vs outbox 0` verifies nothing.

Stripe's summaries lag what was sent, by an amount it does not publish: while a total is short
the step waits, at most `settle_seconds`, reporting its progress. Still short after that, it says
`not settled after N s` when rows of it reached Stripe within the settle lag
(`STRIPE_BILLING_RECONCILE_SETTLE_SECONDS`: Stripe may still be catching up), and `mismatch`
when Stripe has had that long or holds more than was sent. A failed step
skips the steps that depend on it (a live key skips everything, nothing reaches Stripe); the
others still run, so one report shows every problem found.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from billing import logs
from billing.accounts import UnknownOrganizationError, store_subscription
from billing.checks.contract import run_contract_checks
from billing.checks.report import Status, StatusReport
from billing.logs import get_logger
from billing.masking import mask_secret
from billing.models import (
    BillableEvent,
    BillingAccount,
    SubmissionStatus,
    UsageSubmission,
    utcnow,
)
from billing.runtime import Runtime
from billing.stripe_gateway import LiveKeyRefusedError, StripeGatewayError, subscription_period
from billing.usage.claiming import UnbillableReason
from billing.usage.result import FlushResult
from billing.usage.service import flush_pass

log = get_logger("billing.smoke")

ACTIVE_SUBSCRIPTION = ("active", "trialing")
MINUTE = timedelta(minutes=1)
# Stripe aggregates meter events asynchronously and publishes no bound on the lag: a smoke check
# is run by a person, who waits this long at most for a just-sent total to show up.
DEFAULT_SETTLE_SECONDS = 120.0
SETTLE_POLL_SECONDS = 2.0

Progress = Callable[[str], None]


@dataclass
class SmokeStep:
    step: str
    status: Status
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "status": self.status.value,
            "detail": self.detail,
            "values": self.values,
        }


@dataclass
class SmokeReport(StatusReport):
    organization_id: int
    steps: list[SmokeStep] = field(default_factory=list)
    entry_name = "step"

    def entries(self) -> list[SmokeStep]:
        return self.steps

    def to_dict(self) -> dict[str, Any]:
        return {
            "organization_id": self.organization_id,
            "ok": self.ok,
            "steps": [s.to_dict() for s in self.steps],
        }


class _StepFailed(Exception):
    def __init__(self, detail: str, **values: Any) -> None:
        super().__init__(detail)
        self.values = values


@dataclass
class _Run:
    """What one step learns and a later one needs."""

    runtime: Runtime
    organization_id: int
    account: BillingAccount | None = None
    subscription: Any = None
    flush: FlushResult | None = None
    flush_started: datetime | None = None

    @property
    def billing_account(self) -> BillingAccount:
        if self.account is None:  # only if the step order changed
            raise _StepFailed("no billing account loaded")
        return self.account


def smoke_org(
    runtime: Runtime,
    organization_id: int,
    *,
    require_enabled: bool,
    validate_contract: bool,
    refresh_period: bool,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    progress: Progress = lambda message: None,
) -> SmokeReport:
    """Run every step for one organization; raises UnknownOrganizationError for an unknown id.
    `progress` hears what a waiting step waits for (the CLI prints it on stderr)."""
    run = _Run(runtime, organization_id)
    # (step, the steps it needs to have not failed, what it does), in report order.
    steps: list[tuple[str, tuple[str, ...], Callable[[], SmokeStep]]] = [
        ("test_mode", (), lambda: _test_mode(run)),
        ("billing_enabled", ("test_mode",), lambda: _billing_enabled(run, require_enabled)),
        ("billing_account", ("test_mode",), lambda: _billing_account(run)),
        ("stripe_customer", ("billing_account",), lambda: _stripe_customer(run)),
        ("stripe_subscription", ("stripe_customer",), lambda: _stripe_subscription(run)),
        ("refresh_period", ("stripe_subscription",), lambda: _refresh_period(run, refresh_period)),
        ("contract", ("billing_account",), lambda: _contract(run, validate_contract)),
        ("flush", ("billing_enabled", "refresh_period", "contract"), lambda: _flush(run)),
        (
            "meter_summaries",
            ("flush",),
            lambda: _meter_summaries(run, settle_seconds, progress),
        ),
    ]
    report = SmokeReport(organization_id)
    broken: dict[str, str] = {}  # step → the failed step that stopped it (itself if it failed)
    for name, needs, action in steps:
        cause = next((broken[need] for need in needs if need in broken), None)
        result = _skipped(f"not run: {cause} failed") if cause else _attempt(action)
        result.step = name
        report.steps.append(result)
        if cause or result.status is Status.FAIL:
            broken[name] = cause or name
    return report


def _attempt(action: Callable[[], SmokeStep]) -> SmokeStep:
    try:
        return action()
    except _StepFailed as error:
        return SmokeStep("", Status.FAIL, str(error), error.values)
    except StripeGatewayError as error:
        return SmokeStep("", Status.FAIL, f"Stripe: {error}")


def _passed(detail: str, **values: Any) -> SmokeStep:
    return SmokeStep("", Status.PASS, detail, values)


def _skipped(detail: str) -> SmokeStep:
    return SmokeStep("", Status.SKIP, detail)


# steps


def _test_mode(run: _Run) -> SmokeStep:
    key = run.runtime.settings.stripe_secret_key
    if not key:
        raise _StepFailed("STRIPE_SECRET_KEY is not set")
    try:
        run.runtime.stripe.require_test_mode("smoke_org")
    except LiveKeyRefusedError as error:
        raise _StepFailed(
            f"refused: {error} ({mask_secret(key)}); nothing was read or sent"
        ) from error
    return _passed(f"test-mode key {mask_secret(key)}")


def _billing_enabled(run: _Run, required: bool) -> SmokeStep:
    enabled = run.runtime.settings.billing_enabled
    value = f"STRIPE_BILLING_ENABLED={int(enabled)}"
    if required and not enabled:
        raise _StepFailed(f"{value}: billing is off")
    if not required:
        consequence = "" if enabled else "; the flush will send nothing"
        return _skipped(f"{value} (not required){consequence}")
    return _passed(value)


def _billing_account(run: _Run) -> SmokeStep:
    with run.runtime.session_factory() as session:
        run.account = session.get(BillingAccount, run.organization_id)
        if run.account is not None:
            account = run.account
            return _passed(
                f"customer {account.stripe_customer_id}, "
                f"subscription {account.stripe_subscription_id}",
                stripe_customer_id=account.stripe_customer_id,
                stripe_subscription_id=account.stripe_subscription_id,
            )
        events = session.scalar(
            sa.select(sa.func.count()).where(BillableEvent.organization_id == run.organization_id)
        )
    if not events:
        raise UnknownOrganizationError(
            f"organization {run.organization_id} is unknown: no billing account and no billable "
            "events"
        )
    raise _StepFailed(
        f"organization {run.organization_id} has {events} billable event(s) but no billing account",
        billable_events=events,
    )


def _stripe_customer(run: _Run) -> SmokeStep:
    customer_id = run.account.stripe_customer_id if run.account else None
    if not customer_id:
        raise _StepFailed("the billing account has no Stripe customer")
    customer = run.runtime.stripe.retrieve_customer(customer_id)
    if getattr(customer, "deleted", False):
        raise _StepFailed(f"Stripe customer {customer_id} is deleted")
    return _passed(f"{customer_id} exists", stripe_customer_id=customer_id)


def _stripe_subscription(run: _Run) -> SmokeStep:
    account = run.billing_account
    subscription_id = account.stripe_subscription_id
    if not subscription_id:
        raise _StepFailed("the billing account has no Stripe subscription")
    subscription = run.subscription = run.runtime.stripe.retrieve_subscription(subscription_id)
    customer = subscription.customer
    customer_id = customer if isinstance(customer, str) else customer.id
    values = {
        "subscription_id": subscription_id,
        "status": subscription.status,
        "customer": customer_id,
    }
    if customer_id != account.stripe_customer_id:
        raise _StepFailed(
            f"subscription {subscription_id} belongs to {customer_id}, not to the "
            f"account's customer {account.stripe_customer_id}",
            **values,
        )
    if subscription.status not in ACTIVE_SUBSCRIPTION:
        raise _StepFailed(f"subscription {subscription_id} is {subscription.status}", **values)
    return _passed(f"{subscription_id} {subscription.status}", **values)


def _refresh_period(run: _Run, requested: bool) -> SmokeStep:
    if not requested:
        return _skipped("not requested (--refresh-period)")
    synced = store_subscription(run.runtime, run.organization_id, run.subscription)
    if synced.period_start is None:
        raise _StepFailed("the subscription has no current period on its items")
    return _passed(
        f"{synced.period_start:%Y-%m-%d %H:%M} → {synced.period_end:%Y-%m-%d %H:%M} UTC"
        + (" (updated)" if synced.changed else " (unchanged)"),
        **synced.to_dict(),
    )


def _contract(run: _Run, requested: bool) -> SmokeStep:
    if not requested:
        return _skipped("not requested (--validate-contract), or --skip-contract")
    settings = run.runtime.settings
    report = run_contract_checks(
        run.runtime,
        lookback_days=settings.contract_lookback_days,
        organization_id=run.organization_id,
    )
    failures = report.failures()
    if failures:
        raise _StepFailed(
            "; ".join(f"{f['check']}: {f['detail']}" for f in failures), failures=failures
        )
    passed = sum(check.status is Status.PASS for check in report.checks)
    return _passed(f"{passed} checks passed for this organization", checks=report.to_dict())


def _flush(run: _Run) -> SmokeStep:
    # The smoke run's own contract step (scoped, and skippable) replaces the pre-flush gate.
    run.flush_started = utcnow()
    result = run.flush = flush_pass(
        run.runtime, organization_id=run.organization_id, contract_check=False
    )
    values = result.to_dict()
    if not result.enabled:
        return _skipped("billing disabled: nothing flushed")
    if result.blocked:
        checks = ", ".join(f["check"] for f in result.contract_failures)
        raise _StepFailed(f"blocked by the pre-flush contract gate: {checks}", **values)
    # Events a few seconds ahead wait for the next flush; anything else left behind is a defect.
    stuck = {k: v for k, v in result.unbillable.items() if k != UnbillableReason.FUTURE}
    if not result.ok or stuck:
        raise _StepFailed(
            f"sent {result.submissions_sent}, failed {result.submissions_failed}, pending "
            f"{result.submissions_pending}, unbillable {stuck}; last error: {result.last_error}",
            **values,
        )
    return _passed(
        f"claimed {result.events_claimed} event(s), sent {result.submissions_sent} "
        f"submission(s), billed {result.billed_value}",
        **values,
    )


def _meter_summaries(run: _Run, settle_seconds: float, progress: Progress) -> SmokeStep:
    if run.flush is not None and not run.flush.enabled:
        return _skipped("billing disabled: nothing was sent, so nothing verified")
    period = _current_period(run)
    if period is None:
        raise _StepFailed("no current billing period: neither stored nor on the subscription")
    gateway = run.runtime.stripe
    customer_id = run.billing_account.stripe_customer_id or ""
    start, end = _compared_span(period, _sent_span(run, customer_id))
    meters = gateway.meter_by_event_name()
    expected = _outbox_sent(run, customer_id, start, end)
    sent_now = _sent_this_run(run)
    missing = sorted(set(run.runtime.settings.stripe_meters.values()) - set(meters))
    if missing:
        raise _StepFailed(f"no Stripe meter for {', '.join(missing)}")
    wait = _SettleWait(settle_seconds, progress)
    compared: dict[str, dict[str, Any]] = {}
    for event_name in sorted(set(run.runtime.settings.stripe_meters.values())):
        meter_id = meters[event_name].id
        want, last_sent = expected.get(event_name, (0, None))
        total = wait.total(
            event_name,
            want,
            lambda m=meter_id: gateway.meter_event_total(m, customer_id, start, end),
        )
        compared[event_name] = {
            "meter": meter_id,
            "sent_this_run": sent_now.get(event_name, 0),
            "outbox_sent": want,
            "stripe_total": total,
            "last_sent_at": last_sent.isoformat() if last_sent else None,
        }
    _log_wait(run, wait, compared)
    values = {
        "period_start": period[0].isoformat(),
        "period_end": period[1].isoformat(),
        "compared_from": start.isoformat(),
        "compared_to": end.isoformat(),
        "waited_seconds": round(wait.waited, 1),
        "meters": compared,
    }
    summary = "; ".join(
        f"{name}: Stripe {c['stripe_total']} vs outbox {c['outbox_sent']} "
        f"(this run {c['sent_this_run']})"
        for name, c in compared.items()
    )
    verdicts = {name: _verdict(run, c) for name, c in compared.items()}
    if "mismatch" in verdicts.values():
        raise _StepFailed(f"mismatch: {summary}", **values)
    if "not_settled" in verdicts.values():
        lag = run.runtime.settings.reconcile_settle_seconds
        raise _StepFailed(
            f"not settled after {settle_seconds:g} s: {summary}; rows were sent within the "
            f"settle lag ({lag} s), so Stripe may still be aggregating them: run again later, "
            "or with a longer --settle-seconds",
            **values,
        )
    if not any(c["outbox_sent"] for c in compared.values()):
        raise _StepFailed(
            f"nothing verified: no usage was sent to Stripe for {customer_id} between "
            f"{start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC ({summary}); give the "
            "organization billable usage (e.g. `flask billing seed_demo`) and run again",
            **values,
        )
    span = f"{start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M} UTC"
    return _passed(f"{summary}; compared {span}", **values)


def _verdict(run: _Run, compared: Mapping[str, Any]) -> str:
    """`match`; `not_settled`: short, but a row reached Stripe within the settle lag; else
    `mismatch` (short after the lag, or more than was sent, which no lag explains)."""
    stripe, sent = compared["stripe_total"], compared["outbox_sent"]
    if stripe == sent:
        return "match"
    last_sent = compared["last_sent_at"]
    lag = timedelta(seconds=run.runtime.settings.reconcile_settle_seconds)
    if stripe < sent and last_sent and datetime.fromisoformat(last_sent) + lag > utcnow():
        return "not_settled"
    return "mismatch"


@dataclass
class _SettleWait:
    """Re-reads a total while it is short of what was sent, until one deadline for all meters."""

    bound: float
    progress: Progress
    started: float = field(default_factory=time.monotonic)
    waited: float = 0.0

    def total(self, meter: str, want: int, read: Callable[[], int]) -> int:
        while True:
            total = read()
            self.waited = time.monotonic() - self.started
            if total >= want or self.waited >= self.bound:
                return total
            self.progress(
                f"waiting for Stripe's meter event summaries to settle: {meter} {total} of "
                f"{want} after {self.waited:.0f} s (at most {self.bound:g} s)"
            )
            time.sleep(min(SETTLE_POLL_SECONDS, max(0.0, self.bound - self.waited)))


def _log_wait(run: _Run, wait: _SettleWait, compared: Mapping[str, Mapping[str, Any]]) -> None:
    if wait.waited < SETTLE_POLL_SECONDS / 2:  # the first read had it all: nothing waited for
        return
    for meter, c in compared.items():
        log.info(
            logs.SMOKE_SUMMARIES_WAITED,
            extra={
                "organization_id": run.organization_id,
                "meter": meter,
                "waited_seconds": round(wait.waited, 1),
                "bound_seconds": wait.bound,
                "stripe_total": c["stripe_total"],
                "outbox_sent": c["outbox_sent"],
            },
        )


def _current_period(run: _Run) -> tuple[datetime, datetime] | None:
    """The period Stripe just reported (the stored one may be stale), else the stored one."""
    account = run.billing_account
    period = subscription_period(run.subscription)
    if period is None and account.current_period_start and account.current_period_end:
        period = account.current_period_start, account.current_period_end
    return period


def _sent_span(run: _Run, customer_id: str) -> tuple[datetime, datetime] | None:
    """The hours this run's flush sent for the customer (outbox rows marked sent since it began)."""
    if run.flush_started is None:
        return None
    submission = UsageSubmission
    with run.runtime.session_factory() as session:
        first, last = session.execute(
            sa.select(
                sa.func.min(submission.window_start), sa.func.max(submission.window_end)
            ).where(
                submission.organization_id == run.organization_id,
                submission.stripe_customer_id == customer_id,
                submission.status == SubmissionStatus.SENT.value,
                submission.sent_at >= run.flush_started,
            )
        ).one()
    return None if first is None else (first, last)


def _compared_span(
    period: tuple[datetime, datetime], sent: tuple[datetime, datetime] | None
) -> tuple[datetime, datetime]:
    """The period, widened to whole minutes (as event summaries require) and to cover what this
    run sent, so that usage outside the period is verified too, never silently left out."""
    start, end = period if sent is None else (min(period[0], sent[0]), max(period[1], sent[1]))
    floor = start.replace(second=0, microsecond=0)
    ceiling = end.replace(second=0, microsecond=0)
    return floor, ceiling if ceiling == end else ceiling + MINUTE


def _outbox_sent(
    run: _Run, customer_id: str, start: datetime, end: datetime
) -> dict[str, tuple[int, datetime | None]]:
    """What our outbox says reached Stripe for this customer, by meter, in [start, end), and
    when the last of it was sent."""
    submission = UsageSubmission
    with run.runtime.session_factory() as session:
        rows = session.execute(
            sa.select(
                submission.event_name,
                sa.func.sum(submission.value),
                sa.func.max(submission.sent_at),
            )
            .where(
                submission.organization_id == run.organization_id,
                submission.stripe_customer_id == customer_id,
                submission.status == SubmissionStatus.SENT.value,
                submission.window_start >= start,
                submission.window_start < end,
            )
            .group_by(submission.event_name)
        ).all()
    return {name: (int(total), last_sent) for name, total, last_sent in rows}


def _sent_this_run(run: _Run) -> dict[str, int]:
    sent: dict[str, int] = {}
    billed = run.flush.billed_value if run.flush else {}
    for event_type, value in billed.items():
        event_name = run.runtime.settings.stripe_meters.get(event_type, event_type)
        sent[event_name] = sent.get(event_name, 0) + value
    return sent
