"""ops/billing-hourly.cron, the alternative to beat: each line runs as cron would run it (`sh -c`,
cron's bare environment, the env file), with this checkout as the repo, and does its job."""

from __future__ import annotations

import json
import shlex
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import redis

import celeryconfig
from billing.models import WebhookEvent, utcnow
from billing.ops.state import read_reconcile_record, read_run_records
from tests.conftest import TEST_BROKER_URL
from tests.fixtures.processes import recent_usage
from tests.process import ROOT, billing_env

CRON = ROOT / "ops" / "billing-hourly.cron"
CRON_PATH = "/usr/bin:/bin"  # what cron gives a job


def entries() -> dict[str, tuple[list[str], str]]:
    """{what the line runs: (its five schedule fields, its command)}."""
    found = {}
    for line in CRON.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            fields = line.split(None, 5)
            command = fields[5]
            what = next(
                name
                for name in (
                    "run_billing_hourly.sh",
                    "validate_contract",
                    "webhooks sweep",
                    "reconcile --error-reports",
                    "billing reconcile",
                )
                if name in command
            )
            found[what] = (fields[:5], command)
    return found


@pytest.fixture
def run_line(billing_runtime, tmp_path):
    """Run one cron line's command with the repo at this checkout, the env file in tmp_path."""
    queue = f"cron-test-{uuid.uuid4().hex[:8]}"  # nothing else consumes what the sweep queues
    env = billing_env(billing_runtime.settings, STRIPE_BILLING_QUEUE=queue)
    names = ("STRIPE_", "DATABASE_URL", "REDIS_URL", "CELERY_")
    env_file = tmp_path / "billing.env"
    env_file.write_text(
        "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items() if k.startswith(names))
    )

    def run(what: str) -> dict:
        command = entries()[what][1]
        command = command.replace("/etc/billing/billing.env", str(env_file))
        command = command.replace("/path/to/repo", str(ROOT)).replace("/var/log/", f"{tmp_path}/")
        result = subprocess.run(
            ["/bin/sh", "-c", command],
            env={"PATH": CRON_PATH, "HOME": str(tmp_path), "SHELL": "/bin/sh"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        log = Path(command.rsplit(">>", 1)[1].split()[0]).read_text()
        assert result.returncode == 0, log + result.stderr
        return printed_result(log)

    yield run
    broker = redis.Redis.from_url(TEST_BROKER_URL)
    for key in broker.scan_iter(match=f"*{queue}*"):  # the queued task, kombu's bindings
        broker.delete(key)
    broker.close()


def printed_result(log: str) -> dict:
    """The command's JSON result (indented) among its one-line JSON log records."""
    lines = log.splitlines()
    start = max(n for n, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def test_every_job_beat_schedules_has_a_cron_line():
    found = entries()
    assert found["run_billing_hourly.sh"][0] == ["13", "*", "*", "*", "*"]
    assert found["validate_contract"][0] == ["3", "*", "*", "*", "*"]
    assert found["webhooks sweep"][0] == ["*", "*", "*", "*", "*"]
    assert found["billing reconcile"][0] == ["43", "*", "*", "*", "*"]
    assert found["reconcile --error-reports"][0] == ["*/5", "*", "*", "*", "*"]
    # Its cron interval is beat's.
    entry = celeryconfig.beat_schedule["billing-meter-error-reports-reconcile"]
    assert entry["schedule"] == 300
    # The sweep's cron interval is beat's default one.
    assert celeryconfig.beat_schedule["billing-webhook-sweep"]["schedule"] == 60


def test_the_cron_lines_run_and_record_their_runs(billing_runtime, emulator, run_line):
    recent_usage(billing_runtime)
    stuck = utcnow() - timedelta(hours=1)
    with billing_runtime.session_factory.begin() as session:
        session.add(
            WebhookEvent(
                stripe_event_id="evt_stuck",
                type="invoice.created",
                payload={},
                status="received",
                received_at=stuck,
                updated_at=stuck,
            )
        )

    assert run_line("webhooks sweep") == {"queued": 1, "not_queued": 0}
    assert run_line("validate_contract")["ok"] is True
    assert run_line("run_billing_hourly.sh")["events_claimed"] == 2
    # The usage is 20 minutes old: its hour joins the default window once the settle lag passed.
    reconciled = run_line("billing reconcile")
    assert reconciled["ok"] and not any(reconciled["groups"].values())
    assert run_line("reconcile --error-reports") == {"reports": []}

    history, validation = read_run_records(billing_runtime)
    assert history.last_success["events_claimed"] == 2 and history.last_success["result"] == "ok"
    assert validation["ok"] and validation["source"] == "cli"
    assert read_reconcile_record(billing_runtime)["source"] == "cli"
    assert sum(sum(per_meter.values()) for per_meter in emulator.billed().values()) == 15
