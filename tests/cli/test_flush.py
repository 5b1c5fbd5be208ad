"""`flask billing ...` flush commands: exit codes and JSON output."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner
from flask.cli import FlaskGroup

from billing import create_app, db
from billing.models import utcnow
from billing.usage.retry_policy import CALLS_PER_ROW_PER_RUN
from tests.conftest import TEST_BROKER_URL
from tests.factories import add_accounts, add_events, expected_totals


def invoke(settings, *args):
    runner = create_app(settings).test_cli_runner()
    return runner.invoke(args=["billing", *args])


def _events(runtime, orgs):
    rows = [
        {
            "organization_id": org,
            "event_type": "storage_gb_hour",
            "quantity": 10 * org,
            "occurred_at": utcnow() - timedelta(minutes=30),
        }
        for org in orgs
    ]
    add_events(runtime, rows)
    return rows


def test_help_lists_the_guides_commands(settings):
    result = invoke(settings, "--help")
    assert result.exit_code == 0
    for command in ("flush_now", "flush_hourly", "enqueue_hourly", "seed_demo", "db"):
        assert command in result.output


def test_flush_now_prints_json_and_exits_zero(billing_runtime, emulator):
    customers = add_accounts(billing_runtime, [1, 2])
    rows = _events(billing_runtime, [1, 2])
    result = invoke(billing_runtime.settings, "flush_now")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] and payload["events_claimed"] == 2
    assert payload["billed_value"] == {"storage_gb_hour": 30}
    assert emulator.billed() == expected_totals(rows, customers)


def test_flush_now_exits_non_zero_when_stripe_refuses_a_row(billing_runtime, emulator):
    add_accounts(billing_runtime, [5])
    _events(billing_runtime, [5])
    emulator.faults({"path": "/v1/billing/meter_events", "status": 400, "count": 1})
    result = invoke(billing_runtime.settings, "flush_now")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["submissions_failed"] == 1
    assert payload["awaiting_operator"] == {"failed": 1, "held": 0, "rejected": 0}
    assert "wait for an operator (1 failed)" in result.stderr


def test_flush_now_with_billing_disabled_sends_nothing(billing_runtime, emulator):
    add_accounts(billing_runtime, [1])
    _events(billing_runtime, [1])
    result = invoke(billing_runtime.settings.replace(billing_enabled=False), "flush_now")
    assert result.exit_code == 0 and json.loads(result.stdout)["enabled"] is False
    assert emulator.billed() == {}


def test_flush_hourly_skips_while_the_lock_is_held(billing_runtime, emulator, redis_client):
    add_accounts(billing_runtime, [1])
    _events(billing_runtime, [1])
    redis_client.set(billing_runtime.settings.flush_lock_key, "other-run", ex=30)
    result = invoke(billing_runtime.settings, "flush_hourly")
    assert result.exit_code == 0 and json.loads(result.stdout)["skipped"] is True
    assert emulator.billed() == {}


@pytest.mark.parametrize("status", [429, 500])
def test_flush_hourly_retries_then_reports_pending_and_fails(billing_runtime, emulator, status):
    add_accounts(billing_runtime, [1])
    _events(billing_runtime, [1])
    emulator.faults({"path": "/v1/billing/meter_events", "status": status, "count": 1000})
    result = invoke(billing_runtime.settings, "flush_hourly")
    assert result.exit_code == 1
    assert "still pending after transient Stripe errors" in result.output
    # 3 in-process passes share one budget: 5 meter event calls for the row in all (was 3 x 5).
    assert emulator.stats()["requests"]["POST /v1/billing/meter_events"] == CALLS_PER_ROW_PER_RUN


def test_flush_hourly_refuses_to_run_unguarded(billing_runtime, emulator):
    settings = billing_runtime.settings.replace(redis_url="redis://127.0.0.1:1/0")
    result = invoke(settings, "flush_hourly")
    assert result.exit_code == 1
    assert "refusing to flush without the overlap guard" in result.output


def test_bad_configuration_is_one_line_and_exit_one(monkeypatch):
    monkeypatch.setenv("STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS", "soon")
    # Built inside the command line, as `flask` builds it: outside one, create_app() refuses.
    flask = FlaskGroup(create_app=create_app, load_dotenv=False)
    result = CliRunner().invoke(flask, ["billing", "flush_now"])
    assert result.exit_code == 1
    assert "configuration error: STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS" in result.output
    assert "Traceback" not in result.output


def test_enqueue_hourly_puts_the_task_on_the_configured_queue(settings):
    import redis

    broker = redis.Redis.from_url(TEST_BROKER_URL)
    broker.delete("billing-cli-queue")
    result = invoke(settings.replace(billing_queue="billing-cli-queue"), "enqueue_hourly")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    message = json.loads(broker.lpop("billing-cli-queue"))
    assert message["headers"]["task"] == "billing.usage.flush_hourly"
    assert message["headers"]["id"] == payload["task_id"]
    assert payload["queue"] == "billing-cli-queue"


def test_seed_demo_refuses_a_live_key(settings):
    result = invoke(settings.replace(stripe_secret_key="sk_live_" + "a" * 24), "seed_demo")
    assert result.exit_code == 1 and "test mode only" in result.output


@pytest.mark.parametrize("args", [["--orgs", "0"], ["--events", "-1"], ["--hours", "abc"]])
def test_seed_demo_rejects_bad_flags(settings, args):
    assert invoke(settings, "seed_demo", *args).exit_code == 2


def test_seed_demo_then_flush_bills_what_was_seeded(billing_runtime, emulator):
    seeded = invoke(
        billing_runtime.settings,
        "seed_demo",
        "--orgs",
        "3",
        "--events",
        "120",
        "--hours",
        "2",
        "--seed",
        "4",
    )
    assert seeded.exit_code == 0, seeded.output
    made = json.loads(seeded.stdout)
    flushed = json.loads(invoke(billing_runtime.settings, "flush_now").stdout)
    assert flushed["events_claimed"] == 120
    assert flushed["billed_value"] == made["quantity_by_event_type"]


def test_seed_demo_then_smoke_org_passes_for_every_demo_org(billing_runtime, emulator):
    seeded = invoke(billing_runtime.settings, "seed_demo", "--orgs", "2", "--events", "60")
    assert seeded.exit_code == 0, seeded.output
    made = json.loads(seeded.stdout)
    assert set(made["subscriptions"]) == {str(org) for org in made["organizations"]}
    for org in made["organizations"]:
        smoke = invoke(
            billing_runtime.settings,
            "smoke_org",
            "--org-id",
            str(org),
            "--require-enabled",
            "--validate-contract",
            "--fail-closed",
            "--refresh-period",
            "--json",
        )
        assert smoke.exit_code == 0, smoke.output
        steps = {s["step"]: s for s in json.loads(smoke.stdout)["steps"]}
        assert {s["status"] for s in steps.values()} == {"pass"}
        meters = steps["meter_summaries"]["values"]["meters"]
        assert sum(m["stripe_total"] for m in meters.values()) > 0


@pytest.mark.parametrize("command", [["flush_now"], ["db", "upgrade"]])
def test_unreachable_database_is_one_masked_line(settings, command):
    broken = settings.replace(database_url="postgresql://billing:s3cretpw@127.0.0.1:1/none")
    result = invoke(broken, *command)
    assert result.exit_code == 1
    assert "database error" in result.output and "Traceback" not in result.output
    assert "s3cretpw" not in result.output


def test_db_commands_migrate_a_sqlite_file_up_and_down(settings, tmp_path):
    local = settings.replace(database_url=f"sqlite:///{tmp_path / 'cli.db'}")
    head = db.head_revision()
    assert invoke(local, "db", "upgrade").output.strip() == f"database at {head}"
    assert invoke(local, "db", "current").output.strip() == f"current {head} head {head}"
    assert invoke(local, "db", "downgrade", "base").output.strip() == "database at None"


def test_flush_hourly_reports_the_whole_run_not_its_last_pass(billing_runtime, emulator):
    """The first pass claims the row and Stripe fails its 3 calls; the second pass sends it. The
    result said `events_claimed: 0` (the second pass's) although the run claimed and sent one."""
    customers = add_accounts(billing_runtime, [1])
    rows = _events(billing_runtime, [1])
    emulator.faults({"path": "/v1/billing/meter_events", "status": 500, "count": 3})
    result = invoke(billing_runtime.settings, "flush_hourly")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert (payload["events_claimed"], payload["batches"], payload["submissions_sent"]) == (1, 1, 1)
    assert payload["submissions_pending"] == 0
    assert payload["billed_value"] == {"storage_gb_hour": 10}
    assert emulator.stats()["requests"]["POST /v1/billing/meter_events"] == 4
    assert emulator.billed() == expected_totals(rows, customers)


def test_a_failed_flush_hourly_reports_what_its_passes_did(billing_runtime, emulator):
    add_accounts(billing_runtime, [1])
    _events(billing_runtime, [1])
    emulator.faults({"path": "/v1/billing/meter_events", "status": 500, "count": 1000})
    result = invoke(billing_runtime.settings, "flush_hourly")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["events_claimed"] == 1 and payload["submissions_pending"] == 1
