"""The safety commands of the ops guide: validate_contract, preflight, smoke_org, sync_periods.

Each prints a table (or JSON with `--json`) on stdout and exits 1 when it fails closed; usage
errors (a bad flag value, an unknown organization) exit 2.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Protocol

import click
from flask.cli import with_appcontext

from billing.checks.contract import contract_fails_closed, run_contract_checks
from billing.cli.core import emit, operator_errors, runtime
from billing.config import MAX_CONTRACT_LOOKBACK_DAYS
from billing.ops.preflight import run_preflight
from billing.ops.smoke import UnknownOrganizationError, smoke_org
from billing.ops_records import record_contract_validation
from billing.runtime import current_runtime


class Report(Protocol):
    @property
    def ok(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...

    def table(self) -> str: ...


def show(report: Report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str))
    else:
        click.echo(report.table())


def finish(report: Report, *, fail_closed: bool, what: str) -> None:
    if report.ok:
        return
    if fail_closed:
        sys.exit(1)
    click.echo(f"{what} failed; exiting 0 because it is not failing closed", err=True)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")


@click.command("validate_contract")
@with_appcontext
@click.option(
    "--lookback-days",
    type=click.IntRange(min=1, max=MAX_CONTRACT_LOOKBACK_DAYS),
    default=None,
    help="Days of events to check [default: STRIPE_BILLING_CONTRACT_LOOKBACK_DAYS].",
)
@click.option(
    "--require-zeitgeist",
    is_flag=True,
    help="Fail unless recent `zeitgeist` events exist "
    "[default: STRIPE_BILLING_CONTRACT_REQUIRE_ZEITGEIST].",
)
@click.option(
    "--fail-closed",
    is_flag=True,
    help="Exit 1 when any check fails [default: STRIPE_BILLING_CONTRACT_FAIL_CLOSED].",
)
@json_option
def validate_contract_command(
    lookback_days: int | None, require_zeitgeist: bool, fail_closed: bool, as_json: bool
) -> None:
    """Check the upstream billable_events table against the billing contract."""
    rt = runtime()
    settings = rt.settings
    with operator_errors():
        report = run_contract_checks(
            rt,
            lookback_days=lookback_days or settings.contract_lookback_days,
            require_zeitgeist=require_zeitgeist or settings.contract_require_zeitgeist,
        )
    # Recorded for the alert and `status`: cron runs this, and a process's counters die with it.
    record_contract_validation(rt.session_factory, report, source="cli")
    show(report, as_json)
    finish(
        report,
        fail_closed=contract_fails_closed(settings, fail_closed),
        what="contract validation",
    )


@click.command("preflight")
@with_appcontext
@click.option("--require-enabled", is_flag=True, help="Fail unless STRIPE_BILLING_ENABLED=1.")
@click.option("--fail-closed", is_flag=True, help="Exit 1 when any check fails.")
@json_option
def preflight_command(require_enabled: bool, fail_closed: bool, as_json: bool) -> None:
    """Check configuration, database, Redis, the Celery broker and Stripe before billing."""
    report = run_preflight(current_runtime, require_enabled=require_enabled)
    show(report, as_json)
    finish(report, fail_closed=fail_closed, what="preflight")


@click.command("smoke_org")
@with_appcontext
@click.option("--org-id", type=int, required=True, help="The organization to check.")
@click.option("--require-enabled", is_flag=True, help="Fail unless STRIPE_BILLING_ENABLED=1.")
@click.option(
    "--validate-contract", is_flag=True, help="Run the contract checks for this organization first."
)
@click.option("--fail-closed", is_flag=True, help="Exit 1 when any step fails (the default).")
@click.option("--skip-contract", is_flag=True, help="Skip the contract checks (diagnosis).")
@click.option(
    "--no-fail-closed",
    is_flag=True,
    help="Always exit 0 with the report (overrides --fail-closed).",
)
@click.option(
    "--refresh-period",
    is_flag=True,
    help="Sync the subscription's current period from Stripe first.",
)
@json_option
def smoke_org_command(
    org_id: int,
    require_enabled: bool,
    validate_contract: bool,
    fail_closed: bool,
    skip_contract: bool,
    no_fail_closed: bool,
    refresh_period: bool,
    as_json: bool,
) -> None:
    """End-to-end check of one organization in Stripe test mode: flush it, confirm in Stripe."""
    rt = runtime()
    try:
        with operator_errors():
            report = smoke_org(
                rt,
                org_id,
                require_enabled=require_enabled,
                validate_contract=validate_contract and not skip_contract,
                refresh_period=refresh_period,
            )
    except UnknownOrganizationError as error:
        raise click.BadParameter(str(error), param_hint="'--org-id'") from error
    show(report, as_json)
    # Failing closed is the default; --fail-closed only says so explicitly.
    finish(report, fail_closed=not no_fail_closed, what=f"smoke check of organization {org_id}")


@click.command("sync_periods")
@with_appcontext
def sync_periods_command() -> None:
    """Copy every subscription's current billing period from Stripe to its billing account."""
    from billing.accounts import sync_all_periods

    rt = runtime()
    with operator_errors():
        summary = sync_all_periods(rt)
    emit(
        summary,
        f"synced {summary['synced']} of {summary['accounts']} account(s), "
        f"{len(summary['changed'])} changed, {len(summary['failed'])} failed",
    )
    if summary["failed"]:
        sys.exit(1)
