import logging

import pytest

from billing import logs
from billing.config import ConfigError, Settings
from billing.masking import mask_secret, scrub

GUIDE_DEFAULTS = {
    "billing_enabled": False,
    "billing_queue": "default",
    "flush_lock_ttl_seconds": 3300,
    "validate_contract_before_flush": True,
    "contract_lookback_days": 30,
    "contract_require_zeitgeist": False,
    "contract_fail_closed": False,
    "saas_workspace_booking_url": "https://cal.com/andreas-duess-fd/fishdog-demo",
    "stripe_secret_key": None,
    "stripe_webhook_secret": None,
    "stripe_api_base": None,
    "database_url": "sqlite:///billing.db",
    "redis_url": "redis://127.0.0.1:6379/0",
    "celery_broker_url": "redis://127.0.0.1:6379/0",
    "celery_result_backend": None,
    "flush_lock_key": "billing:stripe-usage-flush:lock",
    "stripe_meters": {},
    # Besides the guide's: this package's tuning variables.
    "stripe_max_network_retries": 2,
    "stripe_meter_event_rate_per_second": 20.0,
    "flush_lock_backend": "redis",
    "flush_batch_size": 5000,
    "submit_concurrency": 8,
    "submit_fanout_tasks": 0,
    "submit_fanout_part_rows": 500,
    "resend_window_hours": 23,
    "max_event_quantity": 10**12,
    "max_group_quantity": 10**13,
    "contract_zeitgeist_max_age_hours": 24,
    "broker_visibility_timeout_seconds": 7200,
    "retry_backoff_seconds": 2.0,
    "retry_backoff_max_seconds": 600.0,
    "task_max_retries": 5,
    "log_level": "INFO",
    "log_format": "auto",
    "saas_price_id": None,
    "saas_public_base_url": None,
    "saas_unlock_wait_seconds": 60,
    "webhook_path": "/stripe/webhook",
    "webhook_tolerance_seconds": 300,
    "webhook_max_body_bytes": 512 * 1024,
    "webhook_requeue_after_seconds": 120,
    "webhook_processing_timeout_seconds": 900,
    "webhook_sweep_interval_seconds": 60,
    "flush_lock_lease_seconds": 60,
    "metrics_path": "/metrics",
    "worker_metrics_port": 0,
    "worker_metrics_address": "127.0.0.1",
    "prometheus_multiproc_dir": None,
    "stripe_meter_event_api": "v1",
    "reconcile_settle_seconds": 3600,
}


def test_an_event_ceiling_above_the_group_ceiling_is_refused():
    with pytest.raises(ConfigError, match="STRIPE_USAGE_MAX_EVENT_QUANTITY must not exceed"):
        Settings.from_env(
            {"STRIPE_USAGE_MAX_EVENT_QUANTITY": "500", "STRIPE_USAGE_MAX_GROUP_QUANTITY": "100"}
        )


def test_the_meter_event_api_is_v1_or_v2():
    assert Settings.from_env({"STRIPE_METER_EVENT_API": "V2"}).stripe_meter_event_api == "v2"
    assert Settings.from_env({"STRIPE_METER_EVENT_API": "v1"}).stripe_meter_event_api == "v1"


def test_the_defaults_cover_every_setting():
    import dataclasses

    assert {f.name for f in dataclasses.fields(Settings)} == set(GUIDE_DEFAULTS)


class TestDefaults:
    @pytest.mark.parametrize(("name", "expected"), sorted(GUIDE_DEFAULTS.items()))
    def test_every_default_of_an_empty_environment(self, name, expected):
        assert getattr(Settings.from_env({}), name) == expected

    def test_broker_defaults_to_redis_url(self):
        settings = Settings.from_env({"REDIS_URL": "redis://cache:6379/3"})
        assert settings.celery_broker_url == "redis://cache:6379/3"

    def test_visibility_timeout_outlasts_the_longest_lock_ttl(self):
        settings = Settings.from_env({"STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS": "3599"})
        assert settings.broker_visibility_timeout_seconds == 7200

    @pytest.mark.parametrize("blank", ["", " ", "\t"])
    def test_blank_boolean_is_unset_so_safety_checks_stay_on(self, blank):
        settings = Settings.from_env(
            {
                "STRIPE_BILLING_VALIDATE_CONTRACT_BEFORE_FLUSH": blank,
                "STRIPE_BILLING_ENABLED": blank,
            }
        )
        assert settings.validate_contract_before_flush is True
        assert settings.billing_enabled is False


class TestParsing:
    @pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on"])
    def test_true_values(self, value):
        assert Settings.from_env({"STRIPE_BILLING_ENABLED": value}).billing_enabled is True

    @pytest.mark.parametrize("value", ["0", "false", "No", "off"])
    def test_false_values(self, value):
        env = {"STRIPE_BILLING_VALIDATE_CONTRACT_BEFORE_FLUSH": value}
        assert Settings.from_env(env).validate_contract_before_flush is False

    def test_values_are_read(self):
        settings = Settings.from_env(
            {
                "STRIPE_BILLING_QUEUE": "billing",
                "STRIPE_USAGE_FLUSH_LOCK_KEY": "lock:x",
                "STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS": "600",
                "STRIPE_BILLING_CONTRACT_LOOKBACK_DAYS": "7",
                "STRIPE_BILLING_CONTRACT_REQUIRE_ZEITGEIST": "yes",
                "STRIPE_BILLING_CONTRACT_FAIL_CLOSED": "1",
                "SAAS_WORKSPACE_BOOKING_URL": "https://example.test/book",
                "STRIPE_BILLING_METERS": "api_call, storage=storage_gb_hours",
            }
        )
        assert (settings.billing_queue, settings.flush_lock_key) == ("billing", "lock:x")
        assert settings.flush_lock_ttl_seconds == 600
        assert settings.contract_lookback_days == 7
        assert settings.contract_require_zeitgeist and settings.contract_fail_closed
        assert settings.saas_workspace_booking_url == "https://example.test/book"
        assert settings.stripe_meters == {"api_call": "api_call", "storage": "storage_gb_hours"}

    def test_live_key_raises_the_default_rate(self):
        live = Settings.from_env({"STRIPE_SECRET_KEY": "sk_live_" + "x" * 24})
        test = Settings.from_env({"STRIPE_SECRET_KEY": "sk_test_" + "x" * 24})
        assert (
            live.stripe_meter_event_rate_per_second > 25 > test.stripe_meter_event_rate_per_second
        )


BAD_VALUES = [
    ("STRIPE_BILLING_ENABLED", "maybe"),
    ("STRIPE_BILLING_VALIDATE_CONTRACT_BEFORE_FLUSH", "2"),
    ("STRIPE_BILLING_CONTRACT_REQUIRE_ZEITGEIST", "y e s"),
    ("STRIPE_BILLING_CONTRACT_FAIL_CLOSED", "enabled"),
    ("STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS", "abc"),
    ("STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS", "0"),
    ("STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS", "12.5"),
    ("STRIPE_BILLING_CONTRACT_LOOKBACK_DAYS", "0"),
    ("STRIPE_BILLING_CONTRACT_LOOKBACK_DAYS", "-3"),
    ("STRIPE_BILLING_CONTRACT_LOOKBACK_DAYS", "thirty"),
    ("STRIPE_USAGE_FLUSH_BATCH_SIZE", "0"),
    ("STRIPE_USAGE_SUBMIT_CONCURRENCY", "1000"),
    ("STRIPE_USAGE_FLUSH_LOCK_BACKEND", "memcached"),
    ("STRIPE_METER_EVENT_RATE_PER_SECOND", "fast"),
    ("STRIPE_BILLING_METERS", "api call"),
    ("CELERY_BROKER_VISIBILITY_TIMEOUT_SECONDS", "60"),
    ("STRIPE_MAX_NETWORK_RETRIES", "-1"),
    ("STRIPE_USAGE_RESEND_WINDOW_HOURS", "48"),
    ("STRIPE_USAGE_MAX_EVENT_QUANTITY", "0"),
    ("STRIPE_USAGE_MAX_GROUP_QUANTITY", "1.5"),
    # Past 2**53 Stripe's aggregated totals (JSON doubles) are no longer exact.
    ("STRIPE_USAGE_MAX_GROUP_QUANTITY", str(2**53)),
    ("STRIPE_BILLING_CONTRACT_ZEITGEIST_MAX_AGE_HOURS", "0"),
    ("STRIPE_BILLING_RETRY_BACKOFF_SECONDS", "-2"),
    ("STRIPE_BILLING_TASK_MAX_RETRIES", "many"),
    ("BILLING_LOG_LEVEL", "loud"),
    ("BILLING_LOG_FORMAT", "xml"),
    ("STRIPE_SAAS_PRICE_ID", "prod_Workspace"),
    ("SAAS_WORKSPACE_BOOKING_URL", "cal.com/andreas"),
    ("SAAS_WORKSPACE_BOOKING_URL", "javascript:alert(1)"),
    ("SAAS_PUBLIC_BASE_URL", "app.example.com"),
    ("SAAS_UNLOCK_WAIT_SECONDS", "0"),
    # Every number has an upper bound; inf, nan and 1e400 (= inf) are refused.
    ("STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS", "3600"),
    ("STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS", "99999999999"),
    ("STRIPE_BILLING_CONTRACT_LOOKBACK_DAYS", "99999999999"),
    ("STRIPE_BILLING_CONTRACT_ZEITGEIST_MAX_AGE_HOURS", "99999999999"),
    ("STRIPE_MAX_NETWORK_RETRIES", "99999999999"),
    ("STRIPE_BILLING_TASK_MAX_RETRIES", "99999999999"),
    ("CELERY_BROKER_VISIBILITY_TIMEOUT_SECONDS", "99999999999"),
    ("STRIPE_USAGE_FLUSH_BATCH_SIZE", "99999999999"),
    ("STRIPE_METER_EVENT_RATE_PER_SECOND", "inf"),
    ("STRIPE_METER_EVENT_RATE_PER_SECOND", "1e400"),
    ("STRIPE_BILLING_RETRY_BACKOFF_SECONDS", "nan"),
    ("STRIPE_BILLING_RETRY_BACKOFF_SECONDS", "-inf"),
    ("STRIPE_BILLING_RETRY_BACKOFF_MAX_SECONDS", "1e400"),
    # URLs are checked where they are read, not in a client library's traceback.
    ("REDIS_URL", "notaurl"),
    ("REDIS_URL", "http://cache:6379"),
    ("DATABASE_URL", "billing.db"),
    # PostgreSQL (psycopg2) and SQLite only: anything else failed later with a driver traceback.
    ("DATABASE_URL", "mysql://db.example/billing"),
    ("DATABASE_URL", "postgresql+psycopg://db.example/billing"),
    ("DATABASE_URL", "redis://cache:6379/0"),
    # One meter per event type, one `=` per entry.
    ("STRIPE_BILLING_METERS", "api_call,api_call=x"),
    ("STRIPE_BILLING_METERS", "a=b=c"),
    ("CELERY_BROKER_URL", "localhost"),
    ("CELERY_RESULT_BACKEND", "redis"),
    ("STRIPE_API_BASE", "127.0.0.1:12111"),
    ("STRIPE_METER_EVENT_API", "v3"),
    # 0 trusts a summary at once (tests, an emulator without lag); never negative, at most a day.
    ("STRIPE_BILLING_RECONCILE_SETTLE_SECONDS", "-1"),
    ("STRIPE_BILLING_RECONCILE_SETTLE_SECONDS", "86401"),
    ("STRIPE_BILLING_RECONCILE_SETTLE_SECONDS", "1h"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_names_the_variable_and_the_value(name, value):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({name: value})
    assert name in str(raised.value)
    assert repr(value) in str(raised.value) or value in str(raised.value)


class TestSaasGateMode:
    def test_booking_until_a_price_is_configured(self):
        assert Settings.from_env({}).saas_gate_mode == "booking"
        upgraded = Settings.from_env({"STRIPE_SAAS_PRICE_ID": "price_123"})
        assert upgraded.saas_gate_mode == "upgrade"
        assert upgraded.saas_price_id == "price_123"

    def test_public_base_url_loses_its_trailing_slash(self):
        settings = Settings.from_env({"SAAS_PUBLIC_BASE_URL": "https://app.example.com/"})
        assert settings.saas_public_base_url == "https://app.example.com"


class TestSecrets:
    KEY = "sk_test_51AbCdEfGhIjKlMnOpQrStUv1234"
    HOOK = "whsec_AbCdEfGhIjKlMnOpQrStUv9876"

    def test_mask_keeps_prefix_and_last_four(self):
        assert mask_secret(self.KEY) == "sk_test_…1234"
        assert mask_secret(self.HOOK) == "whsec_…9876"
        assert mask_secret(None) == "<unset>"
        assert mask_secret("sk_test_short") == "sk_test_…"

    def test_repr_and_str_never_show_secrets(self):
        settings = Settings.from_env(
            {
                "STRIPE_SECRET_KEY": self.KEY,
                "STRIPE_WEBHOOK_SECRET": self.HOOK,
                "REDIS_URL": "redis://:hunter2pass@cache:6379/0",
            }
        )
        for text in (repr(settings), str(settings), str(settings.masked())):
            assert self.KEY not in text and self.HOOK not in text and "hunter2pass" not in text
            assert "sk_test_…1234" in text

    def test_logged_settings_are_masked(self, caplog):
        settings = Settings.from_env({"STRIPE_SECRET_KEY": self.KEY})
        with caplog.at_level(logging.INFO, logger="billing"):
            logs.get_logger().info("settings loaded", extra={"settings": settings.masked()})
            logs.get_logger().info("settings %s", settings)
        assert caplog.records and self.KEY not in caplog.text


class TestWebhookSettings:
    def test_secret_rotation_list(self):
        settings = Settings.from_env(
            {"STRIPE_WEBHOOK_SECRET": " whsec_new1234567890, whsec_old1234567890 "}
        )
        assert settings.webhook_secrets == ("whsec_new1234567890", "whsec_old1234567890")
        assert settings.masked()["stripe_webhook_secret"] == "whsec_…7890,whsec_…7890"

    def test_a_secret_that_is_not_a_signing_secret_is_refused(self):
        with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_SECRET") as refused:
            Settings.from_env({"STRIPE_WEBHOOK_SECRET": "whsec_ok1234567890,sk_test_oops123456789"})
        assert "oops" not in str(refused.value)

    @pytest.mark.parametrize("path", ["stripe/webhook", "/a b"])
    def test_webhook_path_must_be_a_path(self, path):
        with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_PATH"):
            Settings.from_env({"STRIPE_WEBHOOK_PATH": path})

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("STRIPE_WEBHOOK_MAX_BODY_BYTES", "10"),
            ("STRIPE_WEBHOOK_TOLERANCE_SECONDS", "0"),
            ("STRIPE_WEBHOOK_PROCESSING_TIMEOUT_SECONDS", "5"),
        ],
    )
    def test_webhook_bounds(self, name, value):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})


def test_bad_url_names_the_variable_without_its_password():
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"REDIS_URL": "cache:hunter2pass@6379"})
    assert "REDIS_URL" in str(raised.value) and "hunter2pass" not in str(raised.value)


def test_every_url_shown_is_masked():
    settings = Settings.from_env(
        {
            "STRIPE_API_BASE": "https://proxy:hunter2pass@stripe.internal",
            "DATABASE_URL": "postgresql://billing:hunter2pass@db/billing",
        }
    )
    shown = settings.masked()
    assert shown["stripe_api_base"] == "https://proxy:***@stripe.internal"
    assert "hunter2pass" not in repr(settings) and "hunter2pass" not in str(shown)


class TestDatabaseUrl:
    @pytest.mark.parametrize(
        "url",
        [
            "postgresql://billing@db/billing",
            "postgres://billing@db/billing",
            "postgresql+psycopg2://billing@db/billing",
            "sqlite:///billing.db",
            "sqlite:////var/lib/billing/billing.db",
        ],
    )
    def test_postgresql_and_sqlite_are_accepted(self, url):
        assert Settings.from_env({"DATABASE_URL": url}).database_url == url

    def test_another_database_is_refused_saying_which_are_supported(self):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({"DATABASE_URL": "mysql://billing:hunter2pass@db/billing"})
        message = str(refused.value)
        assert "PostgreSQL" in message and "SQLite" in message and "mysql://" in message
        assert "hunter2pass" not in message


class TestMeterMap:
    def test_an_event_type_listed_twice_is_refused(self):
        with pytest.raises(ConfigError, match="event type 'api_call' twice"):
            Settings.from_env({"STRIPE_BILLING_METERS": "api_call,api_call=x"})

    def test_an_entry_with_two_equals_signs_is_refused(self):
        with pytest.raises(ConfigError, match=r"'a=b=c'.*one ="):
            Settings.from_env({"STRIPE_BILLING_METERS": "a=b=c"})

    def test_several_event_types_may_share_a_meter(self):
        settings = Settings.from_env({"STRIPE_BILLING_METERS": "api_call=calls,batch_call=calls"})
        assert settings.stripe_meters == {"api_call": "calls", "batch_call": "calls"}


class TestSecretKeyShape:
    """One rule (config.secret_key_problem) for the settings, preflight and the gateway."""

    @pytest.mark.parametrize(
        "key",
        [
            "sk_test_51AbCdEfGhIjKlMnOpQrStUv1234",
            "sk_live_" + "a1" * 12,
            "rk_test_abcd1234",
            "rk_live_" + "Z9" * 50,
        ],
    )
    def test_stripe_key_formats_are_accepted(self, key):
        assert Settings.from_env({"STRIPE_SECRET_KEY": key}).stripe_secret_key == key

    @pytest.mark.parametrize(
        ("key", "words"),
        [
            ("sk_test_probe_abcdef1234", ["after sk_test_", "letters and digits", "'_'"]),
            ("sk_test_abcdef 1234", ["after sk_test_", "letters and digits", "' '"]),
            ("pk_test_publishable1234567", ["publishable key", "sk_", "rk_"]),
            ("whsec_abcdefgh12345678", ["must start with sk_ or rk_"]),
            ("sk_tset_abcdefgh12345678", ["after sk_", "test_ or live_"]),
            ("sk_test_abc", ["after sk_test_", "3 characters", "at least 8"]),
            ("sk_test_", ["after sk_test_", "0 characters", "at least 8"]),
        ],
    )
    def test_a_misshaped_key_is_refused_saying_what_is_wrong(self, key, words):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({"STRIPE_SECRET_KEY": key})
        message = str(refused.value)
        assert message.startswith("STRIPE_SECRET_KEY ")
        for word in words:
            assert word in message, message
        tail = key.split("_", 2)[-1]
        assert len(tail) < 4 or tail not in message  # the key itself is never shown


class TestWebhookSecretShape:
    def test_every_entry_of_a_rotation_list_is_checked_and_named(self):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({"STRIPE_WEBHOOK_SECRET": "whsec_current1234567890,whsec_abc"})
        message = str(refused.value)
        assert "STRIPE_WEBHOOK_SECRET entry 2 of 2" in message
        assert "after whsec_" in message and "3 characters" in message and "at least 8" in message

    @pytest.mark.parametrize(
        ("secret", "words"),
        [
            ("we_1AbCdEfGhIjKlMnOp", ["entry 1 of 1", "must start with whsec_"]),
            ("whsec_abc def12345678", ["after whsec_", "' '"]),
            ('"whsec_abcdef12345678"', ["must start with whsec_"]),
        ],
    )
    def test_a_misshaped_secret_is_refused_saying_what_is_wrong(self, secret, words):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({"STRIPE_WEBHOOK_SECRET": secret})
        for word in words:
            assert word in str(refused.value), str(refused.value)
        assert "12345678" not in str(refused.value)


class TestScrub:
    @pytest.mark.parametrize(
        "token",
        [
            "sk_test_probe_abcdef1234",  # Stripe's shape, with an underscore in the tail
            "sk_tst_12345",  # a typo of the mode, short: echoed almost whole by a server
            "sk_test1234",
            "sk-test-abcdefgh1234",
            "rk_live_abcdefgh",
            "whsec_abc",
            "sk_test_****1234",
        ],
    )
    def test_key_like_tokens_are_masked_to_a_prefix_and_at_most_four_characters(self, token):
        shown = scrub(f"Invalid API Key provided: {token}; stopped")
        assert shown.startswith("Invalid API Key provided: ") and shown.endswith("; stopped")
        masked = shown.removeprefix("Invalid API Key provided: ").removesuffix("; stopped")
        assert "…" in masked and masked != token
        assert len(masked.split("…")[1]) <= 4 and len(masked.split("…")[0]) <= 8

    def test_short_tails_show_no_characters(self):
        assert mask_secret("sk_tst_12345") == "sk_…"
        assert mask_secret("sk_test_****1234") == "sk_test_…"

    def test_words_are_left_alone(self):
        text = "skipped: risk_score of work-queue 'desk_top' sk"
        assert scrub(text) == text
