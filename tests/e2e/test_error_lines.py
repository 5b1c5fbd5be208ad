"""Bad input or configuration: one line naming the problem, a non-zero exit, no traceback or secret.

Each case runs `flask billing …` as the guide writes it, from the project root, in a process of
its own, against the session's PostgreSQL schema and Redis.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

from tests.process import billing_env, run_flask

BROKER_PASSWORD = "brokerPw-do-not-print"
API_PASSWORD = "apiPw-do-not-print"


@pytest.fixture
def env(settings, db_engine):
    return billing_env(settings)


def error_lines(result) -> list[str]:
    """stderr less the JSON log lines: what a person reads."""
    return [
        line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")
    ]


def assert_one_error_line(result, exit_code: int, *names: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == exit_code, output
    assert "Traceback" not in output
    assert "sk_test_billingtests0000" not in output and BROKER_PASSWORD not in output
    lines = error_lines(result)
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, output
    if exit_code == 1:  # not a usage error: nothing but the one line
        assert lines == errors, output
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


CASES = [
    # (extra environment, command, exit code, words the line must hold)
    (
        {},
        [
            "adjustments",
            "add",
            "--org-id",
            "1",
            "--kind",
            "credit",
            "--amount-cents",
            "99999999999999999999",
        ],
        1,
        ["--amount-cents must be at most 99999999"],
    ),
    (
        {"CELERY_BROKER_URL": f"redis://:{BROKER_PASSWORD}@127.0.0.1:1/0"},
        ["enqueue_hourly"],
        1,
        ["Celery broker unreachable", "127.0.0.1:1"],
    ),
    (
        {"STRIPE_BILLING_TASK_MAX_RETRIES": "many"},
        ["enqueue_hourly"],
        1,
        ["STRIPE_BILLING_TASK_MAX_RETRIES", "'many'"],
    ),
    ({"REDIS_URL": "notaurl"}, ["flush_hourly"], 1, ["REDIS_URL", "'notaurl'"]),
    ({}, ["validate_contract", "--lookback-days", "999999"], 2, ["--lookback-days", "999999"]),
    (
        {"STRIPE_BILLING_CONTRACT_LOOKBACK_DAYS": "99999999999"},
        ["validate_contract"],
        1,
        ["STRIPE_BILLING_CONTRACT_LOOKBACK_DAYS", "3650"],
    ),
    ({}, ["db", "upgrade", "no_such_rev"], 1, ["no_such_rev"]),
    (
        {"STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS": "99999999999"},
        ["flush_hourly"],
        1,
        ["STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS", "3599"],
    ),
    (
        {"STRIPE_MAX_NETWORK_RETRIES": "99999999999"},
        ["flush_now"],
        1,
        ["STRIPE_MAX_NETWORK_RETRIES"],
    ),
    ({"STRIPE_BILLING_RETRY_BACKOFF_SECONDS": "inf"}, ["flush_now"], 1, ["'inf'"]),
    ({"STRIPE_METER_EVENT_RATE_PER_SECOND": "nan"}, ["flush_now"], 1, ["'nan'"]),
    ({"STRIPE_BILLING_RETRY_BACKOFF_MAX_SECONDS": "1e400"}, ["flush_now"], 1, ["'1e400'"]),
    ({}, ["flush_now", "--org-id", "424242"], 2, ["organization 424242 is unknown"]),
]


@pytest.mark.parametrize(
    ("extra", "command", "exit_code", "words"),
    CASES,
    ids=[" ".join([*c[0], *c[1]]) for c in CASES],
)
def test_one_error_line(env, extra, command, exit_code, words):
    assert_one_error_line(run_flask({**env, **extra}, *command), exit_code, *words)


def test_blank_boolean_keeps_the_safety_default(env):
    blank = {
        "STRIPE_BILLING_VALIDATE_CONTRACT_BEFORE_FLUSH": " ",
        "STRIPE_BILLING_CONTRACT_FAIL_CLOSED": "",
    }
    result = run_flask({**env, **blank}, "config")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["validate_contract_before_flush"] is True
    assert shown["contract_fail_closed"] is False


def test_config_masks_the_password_of_every_url(env):
    urls = {
        "STRIPE_API_BASE": f"http://emulator:{API_PASSWORD}@127.0.0.1:12111",
        "CELERY_BROKER_URL": f"redis://:{BROKER_PASSWORD}@127.0.0.1:6379/3",
        "CELERY_RESULT_BACKEND": f"redis://user:{BROKER_PASSWORD}@127.0.0.1:6379/4",
    }
    result = run_flask({**env, **urls}, "config")
    assert result.returncode == 0, result.stderr
    assert API_PASSWORD not in result.stdout and BROKER_PASSWORD not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["stripe_api_base"] == "http://emulator:***@127.0.0.1:12111"


# Errors the database or Stripe raises: the same one line, never the SQL or its parameters -------


def assert_one_driver_line(result, *names: str) -> str:
    line = assert_one_error_line(result, 1, *names)
    assert "[SQL:" not in result.stderr and "[parameters:" not in result.stderr, result.stderr
    assert "Background on this error" not in result.stderr, result.stderr
    return line


def flush_result_json(result) -> dict:
    """A failed flush still prints its result for cron: a JSON object on stdout, ok false."""
    shown = json.loads(result.stdout)
    assert shown["ok"] is False, shown
    return shown


@contextmanager
def outbox_missing(engine):
    """billing's outbox table gone (a half-restored database): every flush fails on it."""
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE usage_submissions RENAME TO usage_submissions_away")
    try:
        yield
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "ALTER TABLE usage_submissions_away RENAME TO usage_submissions"
            )


BIGINT_CASES = [
    # (`adjustments add --amount-cents 99999999999999999999` no longer reaches the database: it is
    # above Stripe's largest amount, one line among CASES.)
    ["entitlements", "grant", "--org-id", "99999999999999999999999"],
]


@pytest.mark.parametrize("command", BIGINT_CASES, ids=[c[0] for c in BIGINT_CASES])
def test_a_value_out_of_range_for_the_database_is_one_line(env, command):
    assert_one_driver_line(
        run_flask(env, *command),
        "database error: (psycopg2.errors.NumericValueOutOfRange) bigint out of range",
    )


@pytest.mark.parametrize("command", BIGINT_CASES, ids=[c[0] for c in BIGINT_CASES])
def test_a_value_out_of_range_for_sqlite_is_one_line(env, command, tmp_path):
    sqlite_env = {**env, "DATABASE_URL": f"sqlite:///{tmp_path / 'billing.db'}"}
    assert run_flask(sqlite_env, "db", "upgrade").returncode == 0
    assert_one_driver_line(run_flask(sqlite_env, *command), "too large")


@pytest.mark.parametrize("command", ["flush_now", "flush_hourly"])
def test_a_database_error_in_a_flush_is_one_line_and_a_json_result(env, db_engine, command):
    with outbox_missing(db_engine):
        result = run_flask(env, command)
    line = assert_one_driver_line(
        result, 'database error: (psycopg2.errors.UndefinedTable) relation "usage_submissions"'
    )
    assert "LINE " not in line  # the driver's pointer into the SQL is SQL too
    shown = flush_result_json(result)
    assert shown["error"] == line.removeprefix("Error: ")
    assert shown["events_claimed"] == 0


def test_status_shows_the_failed_flush_in_one_line(env, db_engine):
    with outbox_missing(db_engine):
        assert run_flask(env, "flush_hourly").returncode == 1
    status = run_flask(env, "status")
    assert status.returncode == 0, status.stderr
    last = [line for line in status.stdout.splitlines() if line.startswith("last flush: ")]
    assert len(last) == 1, status.stdout
    assert last[0].endswith(
        " error: database error: "
        '(psycopg2.errors.UndefinedTable) relation "usage_submissions" does not exist'
    ), last[0]
    assert "[SQL:" not in status.stdout and "Background on this error" not in status.stdout
    assert status.stdout.count('relation "usage_submissions" does not exist') == 1


def test_stripe_unreachable_is_one_line_and_a_json_result(billing_runtime):
    from tests.fixtures.processes import recent_usage

    recent_usage(billing_runtime)
    down = billing_env(
        billing_runtime.settings,
        STRIPE_API_BASE="http://127.0.0.1:1",
        STRIPE_MAX_NETWORK_RETRIES="0",
    )
    result = run_flask(down, "flush_hourly")
    line = assert_one_error_line(result, 1, "APIConnectionError", "Network error")
    assert "support@stripe.com. (Network error" in line  # the message's lines, joined
    shown = flush_result_json(result)
    assert shown["submissions_pending"] == 2 and shown["error"] == line.removeprefix("Error: ")
