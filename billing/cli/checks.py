"""`flask billing validate_contract`: the upstream table against the contract, on demand.

It prints a table (or JSON with `--json`) on stdout and exits 1 when it fails closed; a bad flag
value exits 2.
"""

from __future__ import annotations

import click
from flask.cli import with_appcontext

from billing.checks.validation import validate_contract
from billing.cli.core import finish, json_option, operator_errors, runtime, show
from billing.config import MAX_CONTRACT_LOOKBACK_DAYS


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
    with operator_errors():
        report, fails_closed = validate_contract(
            rt,
            lookback_days=lookback_days,
            require_zeitgeist=require_zeitgeist,
            fail_closed=fail_closed,
        )
    show(report, as_json)
    finish(report, fail_closed=fails_closed, what="contract validation")


COMMANDS = (validate_contract_command,)
