"""The flask billing safety commands: flags, output forms and exit codes; and the smoke script."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask.cli import FlaskGroup

from billing import create_app
from billing.config import ConfigError
from billing.models import utcnow
from tests.factories import account_row, add_account, insert_events, subscribe, subscribe_hours_ago

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run_billing_smoke_org.sh"
ORG = 7


@pytest.fixture
def cli():
    """invoke(settings, *args): `flask billing ARGS` on an app built from `settings`."""
    apps = []

    def invoke(settings, *args: str):
        if settings is None:  # from the environment: built inside the command line, as by flask
            flask = FlaskGroup(create_app=create_app, load_dotenv=False)
            return CliRunner().invoke(flask, ["billing", *args])
        app = create_app(settings)
        apps.append(app)
        return app.test_cli_runner().invoke(args=["billing", *args])

    yield invoke
    for app in apps:
        with contextlib.suppress(ConfigError):
            app.extensions["billing"].get().close()


def stdout_json(result) -> dict:
    return json.loads(result.stdout)


class TestValidateContract:
    @pytest.fixture
    def clean(self, settings, db_engine):
        add_account(db_engine, 1, "cus_1")
        insert_events(db_engine, {})
        return settings

    @pytest.fixture
    def defect(self, clean, db_engine):
        return insert_events(
            db_engine, {"event_type": "api_calls", "occurred_at": utcnow() - timedelta(days=10)}
        )

    def test_clean_data_exits_0_with_a_table(self, cli, clean):
        result = cli(clean, "validate_contract", "--fail-closed")
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0].split()[:2] == ["check", "status"]

    def test_a_failure_exits_0_unless_failing_closed(self, cli, clean, defect):
        result = cli(clean, "validate_contract")
        assert result.exit_code == 0
        assert "not failing closed" in result.stderr
        assert cli(clean, "validate_contract", "--fail-closed").exit_code == 1

    def test_fail_closed_defaults_to_the_setting(self, cli, clean, defect):
        assert cli(clean.replace(contract_fail_closed=True), "validate_contract").exit_code == 1

    def test_json_names_the_offending_rows(self, cli, clean, defect):
        result = cli(clean, "validate_contract", "--json")
        report = stdout_json(result)
        [failure] = [c for c in report["checks"] if c["status"] == "fail"]
        assert failure["check"] == "event_type_has_meter"
        assert failure["sample_ids"] == defect and failure["offending_rows"] == 1

    def test_lookback_days_narrows_the_window(self, cli, clean, defect):
        result = cli(clean, "validate_contract", "--lookback-days", "7", "--fail-closed", "--json")
        assert result.exit_code == 0 and stdout_json(result)["lookback_days"] == 7
        narrow = clean.replace(contract_lookback_days=7)  # the default comes from the setting
        assert stdout_json(cli(narrow, "validate_contract", "--json"))["lookback_days"] == 7

    @pytest.mark.parametrize("value", ["0", "-3", "abc"])
    def test_bad_lookback_is_a_usage_error(self, cli, clean, value):
        result = cli(clean, "validate_contract", "--lookback-days", value)
        assert result.exit_code == 2
        assert "Invalid value for '--lookback-days'" in result.output

    def test_unreachable_database_is_one_clean_line(self, cli, settings):
        down = settings.replace(database_url="postgresql://postgres:pw@127.0.0.1:1/test")
        result = cli(down, "validate_contract")
        assert result.exit_code == 1
        assert result.output.startswith("Error: database error:") and ":pw@" not in result.output

    def test_require_zeitgeist_flag_and_setting(self, cli, clean, db_engine):
        with db_engine.begin() as connection:
            connection.exec_driver_sql("UPDATE billable_events SET source = 'batch'")
        assert cli(clean, "validate_contract", "--fail-closed").exit_code == 0
        flagged = cli(clean, "validate_contract", "--require-zeitgeist", "--fail-closed")
        assert flagged.exit_code == 1 and "zeitgeist_fresh" in flagged.stdout
        required = clean.replace(contract_require_zeitgeist=True)
        assert cli(required, "validate_contract", "--fail-closed").exit_code == 1


class TestPreflight:
    def test_healthy_runtime_exits_0(self, cli, billing_settings, make_runtime):
        result = cli(billing_settings, "preflight", "--require-enabled", "--fail-closed")
        assert result.exit_code == 0, result.output
        assert "stripe_meters" in result.stdout

    def test_failures_exit_1_only_when_failing_closed(self, cli, billing_settings, make_runtime):
        off = billing_settings.replace(billing_enabled=False)
        assert cli(off, "preflight").exit_code == 0
        assert cli(off, "preflight", "--fail-closed").exit_code == 0  # enabled not required
        assert cli(off, "preflight", "--require-enabled").exit_code == 0
        failing = cli(off, "preflight", "--require-enabled", "--fail-closed", "--json")
        assert failing.exit_code == 1
        failed = [c["check"] for c in stdout_json(failing)["checks"] if c["status"] == "fail"]
        assert failed == ["billing_enabled"]

    def test_unparseable_environment_is_reported(self, cli, monkeypatch, make_runtime):
        monkeypatch.setenv("STRIPE_BILLING_ENABLED", "maybe")
        result = cli(None, "preflight", "--fail-closed")
        assert result.exit_code == 1
        assert "STRIPE_BILLING_ENABLED must be one of" in result.stdout


class TestSmokeOrg:
    @pytest.fixture
    def subscribed(self, billing_runtime, emulator, billing_settings):
        subscribe_hours_ago(billing_runtime, emulator, ORG, hours=3)
        insert_events(billing_runtime.engine, {"organization_id": ORG, "quantity": 4})
        return billing_settings

    @pytest.fixture
    def unsubscribed(self, billing_runtime, billing_settings):
        customer = billing_runtime.stripe.create_customer("No plan", ORG)
        add_account(billing_runtime.engine, ORG, customer.id)
        return billing_settings

    def test_passing_org_exits_0(self, cli, subscribed, billing_runtime):
        result = cli(
            subscribed,
            "smoke_org",
            "--org-id",
            str(ORG),
            "--require-enabled",
            "--validate-contract",
            "--fail-closed",
            "--refresh-period",
            "--json",
        )
        assert result.exit_code == 0, result.output
        report = stdout_json(result)
        assert {s["step"]: s["status"] for s in report["steps"]}["meter_summaries"] == "pass"
        assert account_row(billing_runtime, ORG).current_period_start is not None

    @pytest.mark.parametrize(
        ("flags", "code"),
        [
            ((), 1),
            (("--fail-closed",), 1),
            (("--no-fail-closed",), 0),
            (("--fail-closed", "--no-fail-closed"), 0),
        ],
    )
    def test_failure_exit_codes(self, cli, unsubscribed, flags, code):
        result = cli(unsubscribed, "smoke_org", "--org-id", str(ORG), *flags)
        assert result.exit_code == code
        assert "stripe_subscription  fail" in result.stdout

    @pytest.mark.parametrize(
        ("flags", "status"),
        [
            (("--validate-contract",), "fail"),
            (("--validate-contract", "--skip-contract"), "skip"),
        ],
    )
    def test_skip_contract_wins(self, cli, subscribed, billing_runtime, flags, status):
        insert_events(billing_runtime.engine, {"organization_id": ORG, "quantity": 0})
        result = cli(subscribed, "smoke_org", "--org-id", str(ORG), "--json", *flags)
        steps = {s["step"]: s["status"] for s in stdout_json(result)["steps"]}
        assert steps["contract"] == status
        assert result.exit_code == 1  # skipped, the bad row still fails the flush

    def test_require_enabled(self, cli, subscribed):
        off = subscribed.replace(billing_enabled=False)
        assert cli(off, "smoke_org", "--org-id", str(ORG)).exit_code == 0
        assert cli(off, "smoke_org", "--org-id", str(ORG), "--require-enabled").exit_code == 1

    def test_unknown_org_is_a_usage_error(self, cli, billing_settings, make_runtime):
        result = cli(billing_settings, "smoke_org", "--org-id", "404", "--no-fail-closed")
        assert result.exit_code == 2
        assert "organization 404 is unknown" in result.output

    def test_org_id_is_required(self, cli, billing_settings):
        result = cli(billing_settings, "smoke_org")
        assert result.exit_code == 2 and "--org-id" in result.output

    def test_live_key_is_refused(self, cli, subscribed):
        live = subscribed.replace(stripe_secret_key="sk_live_" + "realmoney4321")
        result = cli(live, "smoke_org", "--org-id", str(ORG))
        assert result.exit_code == 1
        assert "runs in Stripe test mode only" in result.stdout


class TestSyncPeriods:
    def test_exit_codes(self, cli, billing_runtime, billing_settings):
        subscribe(billing_runtime, 1)
        result = cli(billing_settings, "sync_periods")
        assert result.exit_code == 0, result.output
        assert stdout_json(result)["changed"] == [1]
        add_account(billing_runtime.engine, 2, "cus_gone", "sub_missing")
        failing = cli(billing_settings, "sync_periods")
        assert failing.exit_code == 1
        assert [f["organization_id"] for f in stdout_json(failing)["failed"]] == [2]


class TestScript:
    def run_script(self, *args: str, env: dict[str, str] | None = None):
        return subprocess.run(
            [str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or {})},
            check=False,
        )

    def test_usage_without_an_org_id(self):
        result = self.run_script()
        assert result.returncode == 2 and result.stderr.startswith("usage: ")

    def test_unreadable_env_file(self, tmp_path):
        result = self.run_script("7", env={"BILLING_ENV_FILE": str(tmp_path / "missing.env")})
        assert result.returncode == 2 and "cannot read env file" in result.stderr

    def test_smoke_through_the_script(self, tmp_path, subscribed_env):
        env_file, organization_id = subscribed_env
        env = {"BILLING_ENV_FILE": str(env_file)}
        passed = self.run_script(str(organization_id), "--refresh-period", env=env)
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert "meter_summaries      pass" in passed.stdout
        unknown = self.run_script("404", env=env)
        assert unknown.returncode == 2 and "organization 404 is unknown" in unknown.stderr


@pytest.fixture
def subscribed_env(tmp_path, billing_runtime, billing_settings, emulator):
    subscribe_hours_ago(billing_runtime, emulator, ORG, hours=3)
    insert_events(billing_runtime.engine, {"organization_id": ORG, "quantity": 2})
    settings = billing_settings
    variables = {
        "STRIPE_BILLING_ENABLED": "1",
        "STRIPE_SECRET_KEY": settings.stripe_secret_key,
        "STRIPE_WEBHOOK_SECRET": settings.stripe_webhook_secret,
        "STRIPE_API_BASE": settings.stripe_api_base,
        "STRIPE_BILLING_METERS": ",".join(f"{k}={v}" for k, v in settings.stripe_meters.items()),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "CELERY_BROKER_URL": settings.celery_broker_url,
    }
    env_file = tmp_path / "billing.env"
    env_file.write_text("".join(f"{name}='{value}'\n" for name, value in variables.items()))
    return env_file, ORG
