"""The flush's entry points, bound to a Runtime: one pass (`flush_now`), the guarded hourly run
(the task, beat), and the hourly run with in-process retries (`flush_hourly`). Tasks and CLI
commands call these."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from billing import logs, metrics
from billing.accounts import require_known_organization
from billing.checks.validation import contract_gate
from billing.models import utcnow
from billing.runtime import Runtime
from billing.stripe_gateway import TransientStripeError
from billing.usage import history, retry_policy
from billing.usage.lock import FileFlushLock, FlushLock, LockUnavailableError, RedisFlushLock, held
from billing.usage.result import FlushResult, TransientFlushError
from billing.usage.run import FanOut, flush_usage

log = logs.get_logger("billing.services")

# Redis unreachable (no overlap guard) is retried like Stripe's transient errors: it usually heals.
TRANSIENT_ERRORS = (TransientFlushError, TransientStripeError, LockUnavailableError)


def make_flush_lock(runtime: Runtime) -> FlushLock:
    settings = runtime.settings
    if settings.flush_lock_backend == "file":
        return FileFlushLock(settings.flush_lock_key)
    return RedisFlushLock(
        runtime.redis,
        settings.flush_lock_key,
        settings.flush_lock_ttl_seconds,
        lease_seconds=settings.flush_lock_lease_seconds,
        task_id=logs.bound("task_id"),
    )


def flush_pass(
    runtime: Runtime,
    *,
    organization_id: int | None = None,
    clock: Callable[[], datetime] = utcnow,
    lost_lock: Callable[[], bool] = lambda: False,
    on_progress: Callable[[FlushResult], None] | None = None,
    contract_check: bool = True,
    call_attempts: int = retry_policy.CALLS_PER_ROW_PER_RUN,
    fan_out: FanOut | None = None,
) -> FlushResult:
    """A single flush pass, without the overlap guard (`flask billing flush_now`).

    `contract_check=False` leaves out the pre-flush gate, for callers that ran the checks
    themselves or were told to skip them (smoke_org). An `organization_id` billing does not know
    raises UnknownOrganizationError.
    """
    if organization_id is not None:
        require_known_organization(runtime, organization_id)
    return flush_usage(
        runtime.settings,
        runtime.session_factory,
        lambda: runtime.stripe,
        organization_id=organization_id,
        clock=clock,
        lost_lock=lost_lock,
        contract_gate=contract_gate(runtime, organization_id) if contract_check else None,
        on_progress=on_progress,
        call_attempts=call_attempts,
        fan_out=fan_out,
    )


def flush_guarded(
    runtime: Runtime,
    *,
    clock: Callable[[], datetime] = utcnow,
    on_progress: Callable[[FlushResult], None] | None = None,
    call_attempts: int = retry_policy.CALLS_PER_ROW_PER_RUN,
    fan_out: FanOut | None = None,
) -> FlushResult:
    """The hourly flush under the overlap lock: a second concurrent run returns skipped=true.

    Every run is counted (`billing_flush_runs_total`) and recorded for `status` and the alerts.
    `fan_out` (the hourly task's, when `STRIPE_USAGE_FANOUT_TASKS` is set) hands the sending to
    submit tasks; `flush_now` and `flush_hourly` always send in their own process.
    """
    try:
        result = _flush_under_lock(
            runtime,
            clock=clock,
            on_progress=on_progress,
            call_attempts=call_attempts,
            fan_out=fan_out,
        )
    except LockUnavailableError as error:
        _observe(runtime, history.LOCK_UNAVAILABLE, FlushResult(), error)
        raise
    except Exception as error:
        _observe(runtime, history.ERROR, FlushResult(), error)
        raise
    _observe(runtime, history.outcome_of(result), result)
    return result


def _flush_under_lock(
    runtime: Runtime,
    *,
    clock: Callable[[], datetime],
    on_progress: Callable[[FlushResult], None] | None,
    call_attempts: int,
    fan_out: FanOut | None,
) -> FlushResult:
    if not runtime.settings.billing_enabled:
        return flush_pass(runtime, clock=clock)
    lock = make_flush_lock(runtime)
    with held(lock) as acquired:
        if not acquired:
            log.warning(
                logs.FLUSH_SKIPPED_LOCKED, extra={"lock_key": runtime.settings.flush_lock_key}
            )
            return FlushResult(skipped=True)
        return flush_pass(
            runtime,
            clock=clock,
            lost_lock=lambda: lock.lost,
            on_progress=on_progress,
            call_attempts=call_attempts,
            fan_out=fan_out,
        )


def _observe(
    runtime: Runtime, outcome: str, result: FlushResult, error: Exception | None = None
) -> None:
    """Count the run in this process and record it in the database, where every scrape and
    `status` read it (a cron process's counters die with it; Redis may be what failed)."""
    metrics.observe_flush(result, outcome, runtime.settings.stripe_meters)
    if outcome != history.DISABLED:
        history.record_run(runtime.session_factory, outcome, result, error=error)


def flush_with_retries(
    runtime: Runtime, *, on_progress: Callable[[FlushResult], None] | None = None
) -> FlushResult:
    """`flask billing flush_hourly`: the guarded flush, retried in-process on transient errors;
    the passes share one call budget per row (`usage.retry_policy`). The result (also the one a
    final TransientFlushError carries) covers the whole run: `FlushResult.of_run`."""
    passes = retry_policy.HOURLY_PASSES
    retrying = Retrying(
        stop=stop_after_attempt(retry_policy.passes_allowed(passes)),
        wait=retry_policy.pass_wait(runtime.settings),
        retry=retry_if_exception_type(TRANSIENT_ERRORS),
        reraise=True,
    )
    done: list[FlushResult] = []

    def progress(result: FlushResult) -> None:  # the run's events claimed so far
        assert on_progress is not None
        on_progress(FlushResult.of_run([*done, result]))

    for attempt in retrying:
        with attempt:
            calls = retry_policy.calls_in_pass(attempt.retry_state.attempt_number - 1, passes)
            result = flush_guarded(
                runtime, on_progress=progress if on_progress else None, call_attempts=calls
            )
            done.append(result)
            result = FlushResult.of_run(done).raise_if_transient()
    return result
