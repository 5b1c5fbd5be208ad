"""`flask billing usage correct` and `usage corrections list|settle`: exit codes, what a dry run
writes (nothing), and the JSON the list prints."""

from __future__ import annotations

import json

import sqlalchemy as sa

from billing import create_app
from billing.models import UsageCorrection
from billing.usage.service import flush_pass
from tests.factories import add_accounts
from tests.usage.test_correcting import ORG, this_hour, usage


def cli(settings, *args: str):
    return create_app(settings).test_cli_runner().invoke(args=["billing", "usage", *args])


def correct_args(hour, delta: int, *more: str) -> list[str]:
    return [
        "correct",
        "--org-id",
        str(ORG),
        "--event-type",
        "api_call",
        "--hour",
        f"{hour:%Y-%m-%dT%H:%M}Z",
        "--delta",
        str(delta),
        "--reason",
        "outage hour, agreed with support",
        *more,
    ]


def recorded(runtime) -> list[UsageCorrection]:
    with runtime.session_factory() as session:
        return list(session.scalars(sa.select(UsageCorrection)))


def test_correct_records_lists_and_refuses(billing_runtime, emulator):
    settings = billing_runtime.settings
    customer = add_accounts(billing_runtime, [ORG])[ORG]
    hour = this_hour(2)
    usage(billing_runtime, hour, 6, 4)
    flush_pass(billing_runtime)

    dry = cli(settings, *correct_args(hour, -3, "--dry-run"))
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["dry_run"] is True and not recorded(billing_runtime)

    too_much = cli(settings, *correct_args(hour, -11))
    assert too_much.exit_code == 1
    assert "Error: retraction of 11 exceeds the 10 billed" in too_much.output
    assert not recorded(billing_runtime)

    made = cli(settings, *correct_args(hour, -3, "--actor", "alice", "--idempotency-key", "T-1"))
    assert made.exit_code == 0, made.output
    shown = json.loads(made.stdout)
    assert (shown["status"], shown["actor"], shown["idempotency_key"]) == (
        "requested",
        "alice",
        "T-1",
    )
    again = cli(settings, *correct_args(hour, -3, "--idempotency-key", "T-1"))
    assert json.loads(again.stdout)["already_recorded"] is True
    assert len(recorded(billing_runtime)) == 1

    flush_pass(billing_runtime)
    assert emulator.billed()[customer]["api_call"] == 7
    listed = cli(settings, "corrections", "list", "--org-id", str(ORG), "--json")
    assert listed.exit_code == 0, listed.output
    listing = json.loads(listed.stdout)
    assert listing["counts"]["applied"] == 1 and listing["rejected_upstream"] == []
    (one,) = listing["corrections"]
    assert (one["status"], one["method"], one["delta"], one["billed_before"]) == (
        "applied",
        "cancel_restate",
        -3,
        10,
    )
    (cancelled,) = one["sent"]["cancelled"]
    assert (cancelled["value"], cancelled["status"]) == (10, "cancelled")
    assert (one["sent"]["meter_event"]["value"], one["sent"]["meter_event"]["status"]) == (
        7,
        "sent",
    )
    table = cli(settings, "corrections", "list")
    assert table.exit_code == 0 and "cancel_restate" in table.stdout and "value 7" in table.stdout
    assert cli(settings, "corrections", "list", "--org-id", "99", "--json").exit_code == 0


def test_bad_input_exits_with_one_line(billing_runtime, emulator):
    settings = billing_runtime.settings
    add_accounts(billing_runtime, [ORG])
    bad_hour = cli(settings, *correct_args(this_hour(1), -1)[:6], "yesterday", "--delta", "-1")
    assert bad_hour.exit_code == 2 and "is not an ISO 8601 time" in bad_hour.output
    zero = cli(settings, *correct_args(this_hour(1), 0))
    assert zero.exit_code == 1 and "must not be 0" in zero.output
    settle = cli(settings, "corrections", "settle", "5", "--cancelled", "--reason", "x")
    assert settle.exit_code == 1 and "usage correction 5 does not exist" in settle.output
