"""Entry points of the service layer, bound to a Runtime. Tasks and CLI commands call these."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from billing import logs
from billing.locks import FileFlushLock, FlushLock, RedisFlushLock, held
from billing.models import utcnow
from billing.runtime import Runtime
from billing.stripe_gateway import TransientStripeError
from billing.usage import FlushResult, TransientFlushError, flush_usage

log = logs.get_logger("billing.services")

HOURLY_ATTEMPTS = 3
TRANSIENT_ERRORS = (TransientFlushError, TransientStripeError)


def make_flush_lock(runtime: Runtime) -> FlushLock:
    settings = runtime.settings
    if settings.flush_lock_backend == "file":
        return FileFlushLock(settings.flush_lock_key)
    return RedisFlushLock(runtime.redis, settings.flush_lock_key, settings.flush_lock_ttl_seconds)


def contract_gate(
    runtime: Runtime, organization_id: int | None = None
) -> Callable[[], list[dict[str, Any]]]:
    """The pre-flush contract checks, over the organization being flushed (or all)."""

    def failed_checks() -> list[dict[str, Any]]:
        from billing.contract import run_contract_checks

        report = run_contract_checks(
            runtime,
            lookback_days=runtime.settings.contract_lookback_days,
            organization_id=organization_id,
        )
        return report.failures()

    return failed_checks


def flush_once(
    runtime: Runtime,
    *,
    organization_id: int | None = None,
    clock: Callable[[], datetime] = utcnow,
    lost_lock: Callable[[], bool] = lambda: False,
    on_progress: Callable[[FlushResult], None] | None = None,
    contract_check: bool = True,
) -> FlushResult:
    """A single flush pass, without the overlap guard (`flask billing flush_now`).

    `contract_check=False` leaves out the pre-flush gate, for callers that ran the checks
    themselves or were told to skip them (smoke_org).
    """
    return flush_usage(
        runtime.settings,
        runtime.session_factory,
        lambda: runtime.stripe,
        organization_id=organization_id,
        clock=clock,
        lost_lock=lost_lock,
        contract_gate=contract_gate(runtime, organization_id) if contract_check else None,
        on_progress=on_progress,
    )


def flush_guarded(
    runtime: Runtime,
    *,
    clock: Callable[[], datetime] = utcnow,
    on_progress: Callable[[FlushResult], None] | None = None,
) -> FlushResult:
    """The hourly flush under the overlap lock: a second concurrent run returns skipped=true."""
    if not runtime.settings.billing_enabled:
        return flush_once(runtime, clock=clock)
    lock = make_flush_lock(runtime)
    with held(lock) as acquired:
        if not acquired:
            log.warning(
                logs.FLUSH_SKIPPED_LOCKED, extra={"lock_key": runtime.settings.flush_lock_key}
            )
            return FlushResult(skipped=True)
        return flush_once(
            runtime, clock=clock, lost_lock=lambda: lock.lost, on_progress=on_progress
        )


def flush_with_retries(
    runtime: Runtime, *, on_progress: Callable[[FlushResult], None] | None = None
) -> FlushResult:
    """`flask billing flush_hourly`: the guarded flush, retried in-process on transient errors."""
    base = runtime.settings.retry_backoff_seconds
    retrying = Retrying(
        stop=stop_after_attempt(HOURLY_ATTEMPTS),
        wait=wait_exponential_jitter(
            multiplier=base, max=runtime.settings.retry_backoff_max_seconds, jitter=base
        ),
        retry=retry_if_exception_type(TRANSIENT_ERRORS),
        reraise=True,
    )
    return retrying(lambda: flush_guarded(runtime, on_progress=on_progress).raise_if_transient())
