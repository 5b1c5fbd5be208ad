"""Long CLI runs show a progress bar on a terminal and stay silent in pipes (cron, logs)."""

from __future__ import annotations

import os
import pty
import subprocess
from datetime import timedelta

import pytest

from billing.models import utcnow
from tests.factories import add_accounts, add_events
from tests.fixtures.processes import BIN, settings_env


def run_cli(env: dict[str, str], *args: str, tty: bool) -> tuple[int, str]:
    """Run `flask billing ARGS` with stderr on a pseudo-terminal (or a pipe); its stderr."""
    command = [str(BIN / "flask"), "--app", "billing", "billing", *args]
    if not tty:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stderr
    leader, follower = pty.openpty()
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=follower) as process:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = process.wait(timeout=120)
    os.close(leader)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.fixture
def backlog(billing_runtime, emulator):
    add_accounts(billing_runtime, [1, 2])
    add_events(
        billing_runtime,
        [
            {
                "organization_id": 1 + n % 2,
                "event_type": "api_call",
                "quantity": 1,
                "occurred_at": utcnow() - timedelta(hours=3, minutes=n % 50),
            }
            for n in range(40)
        ],
    )
    return settings_env(
        billing_runtime.settings, STRIPE_USAGE_FLUSH_BATCH_SIZE="10", BILLING_LOG_LEVEL="error"
    )


def test_flush_shows_a_bar_on_a_terminal_only(backlog):
    code, shown = run_cli(backlog, "flush_now", tty=True)
    assert code == 0, shown
    assert "flushing" in shown and "40/40" in shown
    code, piped = run_cli(backlog, "flush_now", tty=False)
    assert code == 0 and "flushing" not in piped


def test_reconcile_shows_a_bar_on_a_terminal_only(backlog):
    assert run_cli(backlog, "flush_now", tty=False)[0] == 0
    window = ["--since", (utcnow() - timedelta(hours=6)).strftime("%Y-%m-%dT%H:00:00")]
    code, shown = run_cli(backlog, "reconcile", *window, tty=True)
    assert code == 0, shown
    assert "reconciling" in shown and "100%" in shown
    code, piped = run_cli(backlog, "reconcile", *window, tty=False)
    assert code == 0 and piped.strip() == ""
