"""Running the contract checks: before a flush (the gate), on a schedule (beat, minute 3) and on
demand (`flask billing validate_contract`). The fail-closed policy is decided here, once, and
every full validation is recorded where `status` and every scrape read it (cron's CLI process
dies with its counters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from billing import logs, metrics, ops_records
from billing.checks.contract import ContractReport, run_contract_checks
from billing.checks.report import GateVerdict
from billing.config import Settings
from billing.runtime import Runtime

log = logs.get_logger("billing.services")


def contract_fails_closed(settings: Settings, requested: bool = False) -> bool:
    """A failed check stops the flush (the pre-flush gate) or exits 1 (`validate_contract`) when
    asked with `--fail-closed` or when STRIPE_BILLING_CONTRACT_FAIL_CLOSED=1; otherwise it is
    reported and billing goes on."""
    return requested or settings.contract_fail_closed


def contract_gate(
    runtime: Runtime, organization_id: int | None = None
) -> Callable[[], GateVerdict] | None:
    """The pre-flush contract checks over the organization being flushed (or all), with the
    fail-closed policy applied; None when STRIPE_BILLING_VALIDATE_CONTRACT_BEFORE_FLUSH=0."""
    if not runtime.settings.validate_contract_before_flush:
        return None

    def verdict() -> GateVerdict:
        report = run_contract_checks(runtime, organization_id=organization_id)
        return GateVerdict(report.failures(), blocks=contract_fails_closed(runtime.settings))

    return verdict


def validate_contract(
    runtime: Runtime,
    *,
    lookback_days: int | None = None,
    require_zeitgeist: bool = False,
    fail_closed: bool = False,
    source: str = "cli",
) -> tuple[ContractReport, bool]:
    """One full validation, recorded; returns the report and whether its failure fails closed.
    A flag asks for a check the settings do not require (`--require-zeitgeist`, `--fail-closed`)."""
    report = run_contract_checks(
        runtime, lookback_days=lookback_days, require_zeitgeist=require_zeitgeist or None
    )
    record_contract_validation(runtime.session_factory, report, source=source)
    return report, contract_fails_closed(runtime.settings, fail_closed)


def validate_contract_scheduled(runtime: Runtime) -> dict[str, Any]:
    """The scheduled contract check (beat, minute 3): logged, counted and recorded (the alert
    reads the record), so it fires before a fail-closed flush at minute 13 is blocked. Returns
    the failed checks' names."""
    report, fails_closed = validate_contract(runtime, source="schedule")
    failed = [failure["check"] for failure in report.failures()]
    metrics.observe_contract_validation(failed)
    fields = {"failed_checks": failed, "blocks_flush": bool(failed) and fails_closed}
    if failed:
        log.error(logs.CONTRACT_CHECK_FAILED, extra=fields)
    else:
        log.info(logs.CONTRACT_CHECK_PASSED, extra=fields)
    return {"ok": not failed, **fields}


def record_contract_validation(
    session_factory: sessionmaker[Session], report: ContractReport, *, source: str
) -> bool:
    """The last full contract validation (`validate_contract` run by cron or a person, or beat's
    scheduled task): when, from where, and which checks failed."""
    failed = [failure["check"] for failure in report.failures()]
    entry = {
        "at": report.now.isoformat(),
        "ok": not failed,
        "failed_checks": failed,
        "lookback_days": report.lookback_days,
        "source": source,
    }
    return ops_records.update_record(
        session_factory, ops_records.CONTRACT_VALIDATION, lambda _previous: entry
    )
