"""Preflight against real PostgreSQL, Redis, the Celery broker and the Stripe emulator."""

from __future__ import annotations

import json

import pytest

from billing.checks.report import Status
from billing.config import ConfigError, Settings
from billing.masking import scrub
from billing.ops.preflight import run_preflight

LIVE_KEY = "sk_live_" + "preflightsecret9876"


def statuses(report) -> dict[str, Status]:
    return {c.check: c.status for c in report.checks}


def detail(report, name: str) -> str:
    return next(c.detail for c in report.checks if c.check == name)


def failed(report) -> set[str]:
    return {f["check"] for f in report.failures()}


def test_everything_passes(billing_runtime):
    report = run_preflight(billing_runtime, require_enabled=True)
    assert report.ok, report.table()
    assert set(statuses(report).values()) == {Status.PASS}
    assert "migrations at head" in detail(report, "database")
    assert detail(report, "stripe_meters") == "2 meter(s) active: api_call, storage_gb_hour"


def test_a_bad_variable_is_a_failed_check_not_a_crash():
    def load() -> Settings:
        return Settings.from_env({"STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS": "soon"})

    with pytest.raises(ConfigError):
        load()
    report = run_preflight(load, require_enabled=False)
    assert statuses(report)["config_parses"] is Status.FAIL
    assert "STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS" in detail(report, "config_parses")
    assert {s for name, s in statuses(report).items() if name != "config_parses"} == {Status.SKIP}


class TestConfiguration:
    @pytest.mark.parametrize(
        ("changes", "check", "message"),
        [
            ({"stripe_secret_key": None}, "stripe_secret_key", "is not set"),
            (
                {"stripe_secret_key": "pk_test_publishable1234567"},
                "stripe_secret_key",
                "pk_ is a publishable key",
            ),
            (
                {"stripe_webhook_secret": "secret_without_prefix"},
                "stripe_webhook_secret",
                "entry 1 of 1 (…efix): must start with whsec_",
            ),
            (
                {"stripe_webhook_secret": "whsec_short"},
                "stripe_webhook_secret",
                "5 characters after whsec_, want at least 8",
            ),
            ({"stripe_webhook_secret": None}, "stripe_webhook_secret", "is not set"),
            ({"flush_lock_ttl_seconds": 3600}, "flush_lock_ttl", "must be between 1 and 3599"),
            ({"flush_lock_ttl_seconds": 0}, "flush_lock_ttl", "must be between 1 and 3599"),
            ({"billing_queue": "billing queue"}, "billing_queue", "STRIPE_BILLING_QUEUE"),
            ({"billing_enabled": False}, "billing_enabled", "billing is off"),
        ],
    )
    def test_each_bad_value_fails_its_check(
        self, make_runtime, billing_settings, changes, check, message
    ):
        report = run_preflight(
            make_runtime(billing_settings.replace(**changes)), require_enabled=True
        )
        assert check in failed(report)
        assert message in detail(report, check)

    def test_a_rotation_list_passes_with_every_secret_masked(self, make_runtime, billing_settings):
        rotating = "whsec_newsecret12345678,whsec_oldsecret87654321"
        report = run_preflight(
            make_runtime(billing_settings.replace(stripe_webhook_secret=rotating)),
            require_enabled=True,
        )
        assert statuses(report)["stripe_webhook_secret"] is Status.PASS, report.table()
        assert detail(report, "stripe_webhook_secret") == "2 secrets: whsec_…5678, whsec_…4321"

    def test_the_key_rule_is_the_settings(self, make_runtime, billing_settings):
        """`sk_test_probe_abcdef1234` (an underscore in the tail): preflight's check fails it with
        the line the settings refuse it with, so no process configured by the environment (a
        flush, a worker, the web command) runs with it either (tests/e2e/test_refuse_to_start)."""
        key = "sk_test_probe_abcdef1234"
        report = run_preflight(
            make_runtime(billing_settings.replace(stripe_secret_key=key)), require_enabled=True
        )
        expected = (
            "STRIPE_SECRET_KEY sk_test_…1234: after sk_test_ only letters and digits may "
            "follow, found '_'"
        )
        assert detail(report, "stripe_secret_key") == expected
        assert statuses(report)["stripe_access"] is Status.SKIP
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({"STRIPE_SECRET_KEY": key})
        assert str(refused.value) == expected

    def test_enabled_is_only_checked_when_required(self, make_runtime, billing_settings):
        rt = make_runtime(billing_settings.replace(billing_enabled=False))
        report = run_preflight(rt, require_enabled=False)
        assert statuses(report)["billing_enabled"] is Status.SKIP and report.ok

    def test_secrets_are_masked_everywhere(self, make_runtime, billing_settings):
        rt = make_runtime(
            billing_settings.replace(
                stripe_secret_key=LIVE_KEY,
                stripe_webhook_secret="whsec_webhooksecret5555",
                celery_broker_url="redis://:brokerpassword@127.0.0.1:1/0",
            )
        )
        text = json.dumps(run_preflight(rt, require_enabled=True).to_dict(), ensure_ascii=False)
        for secret in (LIVE_KEY, "whsec_webhooksecret5555", "brokerpassword"):
            assert secret not in text
        assert "sk_live_…9876" in text and "whsec_…5555" in text

    def test_scrub_masks_keys_and_url_passwords(self):
        assert scrub(f"bad {LIVE_KEY} at postgresql://u:pw@h/db") == (
            "bad sk_live_…9876 at postgresql://u:***@h/db"
        )


class TestServices:
    def test_database_behind_on_migrations(self, make_runtime, billing_settings, tmp_path):
        empty = billing_settings.replace(database_url=f"sqlite:///{tmp_path / 'empty.db'}")
        report = run_preflight(empty, require_enabled=True)  # Settings: run_preflight builds it
        assert "database" in failed(report)
        assert "migrations at none, head" in detail(report, "database")

    def test_database_unreachable(self, billing_settings):
        settings = billing_settings.replace(database_url="postgresql://postgres@127.0.0.1:1/test")
        report = run_preflight(settings, require_enabled=True)
        assert failed(report) == {"database"}
        assert "OperationalError" in detail(report, "database")

    def test_redis_unreachable_fails_the_lock_and_broker_checks(self, billing_settings):
        down = "redis://127.0.0.1:1/0"
        report = run_preflight(
            billing_settings.replace(redis_url=down, celery_broker_url=down), require_enabled=True
        )
        assert failed(report) == {"flush_lock", "celery_broker"}

    def test_a_held_flush_lock_is_reported_and_left_alone(self, billing_runtime, redis_client):
        key = billing_runtime.settings.flush_lock_key
        redis_client.set(key, "another-flush", px=60_000)
        report = run_preflight(billing_runtime, require_enabled=True)
        assert statuses(report)["flush_lock"] is Status.PASS
        assert "is held by a running flush" in detail(report, "flush_lock")
        assert redis_client.get(key) == b"another-flush"
        assert redis_client.keys(f"{key}:preflight:*") == []  # the probe key is gone

    def test_file_lock_backend_is_probed(self, make_runtime, billing_settings):
        rt = make_runtime(billing_settings.replace(flush_lock_backend="file"))
        report = run_preflight(rt, require_enabled=True)
        assert detail(report, "flush_lock") == "file lock backend: probe lock taken and released"

    def test_stripe_unreachable_skips_the_meter_check(self, make_runtime, billing_settings):
        rt = make_runtime(
            billing_settings.replace(
                stripe_api_base="http://127.0.0.1:1", stripe_max_network_retries=0
            )
        )
        report = run_preflight(rt, require_enabled=True)
        assert failed(report) == {"stripe_access"}
        assert statuses(report)["stripe_meters"] is Status.SKIP

    def test_missing_and_inactive_meters(self, make_runtime, billing_settings, billing_runtime):
        meter = billing_runtime.stripe.meter_by_event_name()["storage_gb_hour"]
        billing_runtime.stripe.client.v1.billing.meters.deactivate(meter.id)
        meters = {**billing_settings.stripe_meters, "gpu": "gpu_seconds"}
        report = run_preflight(
            make_runtime(billing_settings.replace(stripe_meters=meters)), require_enabled=True
        )
        assert failed(report) == {"stripe_meters"}
        assert detail(report, "stripe_meters") == (
            "meters missing: gpu_seconds; inactive: storage_gb_hour"
        )

    def test_no_meters_configured(self, make_runtime, billing_settings):
        report = run_preflight(
            make_runtime(billing_settings.replace(stripe_meters={})), require_enabled=True
        )
        assert "STRIPE_BILLING_METERS is empty" in detail(report, "stripe_meters")


def test_report_forms(billing_runtime):
    report = run_preflight(billing_runtime, require_enabled=False)
    as_dict = report.to_dict()
    assert as_dict["ok"] is True and as_dict["require_enabled"] is False
    assert as_dict["checks"][0]["check"] == "config_parses"
    lines = report.table().splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    assert len(lines) == len(report.checks) + 1


class TestMeterEventApiV2:
    def test_a_session_is_created(self, make_runtime, billing_settings, emulator):
        report = run_preflight(
            make_runtime(billing_settings.replace(stripe_meter_event_api="v2")),
            require_enabled=True,
        )
        assert report.ok, report.table()
        assert detail(report, "stripe_access").endswith("; v2 meter event session created")
        assert emulator.stats()["meter_event_stream"]["sessions"] == 1

    def test_a_refused_session_fails_stripe_access(self, make_runtime, billing_settings, emulator):
        emulator.faults({"path": "/v2/billing/meter_event_session", "status": 400})
        rt = make_runtime(billing_settings.replace(stripe_meter_event_api="v2"))
        report = run_preflight(rt, require_enabled=True)
        assert failed(report) == {"stripe_access"}
        assert statuses(report)["stripe_meters"] is Status.SKIP

    def test_v1_creates_no_session(self, billing_runtime, emulator):
        assert run_preflight(billing_runtime, require_enabled=True).ok
        assert emulator.stats()["meter_event_stream"]["sessions"] == 0
