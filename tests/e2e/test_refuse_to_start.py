"""No bad setting starts a server; none breaks `flask billing --help`.

A server (a WSGI server building `create_app()`, `flask run`) reads every setting when it builds
the app and refuses to start; a `flask billing` command reads them when it runs and exits 1 with
the one configuration line. The README's web command is in tests/e2e/test_web_command.py.
"""

from __future__ import annotations

import subprocess

import pytest

from billing import create_app
from billing.config import ConfigError
from tests.e2e.test_error_lines import assert_one_error_line
from tests.fixtures.processes import free_port
from tests.process import BIN, ROOT, billing_env, run_flask

# (variable, value, the configuration line's text after `Error: configuration error: `)
BAD_SETTINGS = [
    (
        "STRIPE_WEBHOOK_TOLERANCE_SECONDS",
        "abc",
        "STRIPE_WEBHOOK_TOLERANCE_SECONDS must be a whole number, got 'abc'",
    ),
    (
        "STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS",
        "abc",
        "STRIPE_USAGE_FLUSH_LOCK_TTL_SECONDS must be a whole number, got 'abc'",
    ),
    (
        "STRIPE_WEBHOOK_PATH",
        "hook",
        "STRIPE_WEBHOOK_PATH must be a URL path starting with /, got 'hook'",
    ),
    (
        "BILLING_METRICS_PATH",
        "metrics",
        "BILLING_METRICS_PATH must be a URL path starting with /, got 'metrics'",
    ),
    (
        "DATABASE_URL",
        "mysql://billing@db.example/billing",
        "DATABASE_URL must be a PostgreSQL or SQLite URL",
    ),
    (
        "STRIPE_SECRET_KEY",
        "sk_test_probe_abcdef1234",
        "STRIPE_SECRET_KEY sk_test_…1234: after sk_test_ only letters and digits may follow",
    ),
]
IDS = [f"{name}={value}" for name, value, _ in BAD_SETTINGS]


@pytest.fixture
def env(settings, db_engine):
    return billing_env(settings)


@pytest.mark.parametrize(("name", "value", "line"), BAD_SETTINGS, ids=IDS)
def test_help_still_works(env, name, value, line):
    result = run_flask({**env, name: value}, "--help")
    assert result.returncode == 0, result.stderr
    assert "flush_now" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize(("name", "value", "line"), BAD_SETTINGS, ids=IDS)
@pytest.mark.parametrize("command", [["config"], ["flush_now"], ["db", "upgrade"], ["status"]])
def test_every_command_exits_with_the_configuration_line(env, name, value, line, command):
    error = assert_one_error_line(run_flask({**env, name: value}, *command), 1)
    assert error.startswith(f"Error: configuration error: {line}"), error


@pytest.mark.parametrize(("name", "value", "line"), BAD_SETTINGS, ids=IDS)
def test_flask_run_refuses_to_serve(env, name, value, line):
    port = free_port()
    result = subprocess.run(
        [str(BIN / "flask"), "run", "--port", str(port)],
        cwd=ROOT,
        env={**env, name: value},
        capture_output=True,
        text=True,
        timeout=60,  # a refusal exits at once; 15 s was too tight on a loaded 2-core machine
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: configuration error: {line}")


def test_a_wsgi_server_building_the_app_gets_the_error(monkeypatch):
    """Outside a command (gunicorn's worker, any WSGI server) the app is built with its settings
    read, or not at all: nothing half-configured answers requests."""
    monkeypatch.setenv("STRIPE_WEBHOOK_TOLERANCE_SECONDS", "abc")
    with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_TOLERANCE_SECONDS"):
        create_app()
