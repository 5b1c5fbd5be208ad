"""The worker unit's stop (SIGTERM to the main process: Celery's warm shutdown) lets a running
flush finish, bill everything and release its lock before the worker exits."""

from __future__ import annotations

import signal
import time

from billing.usage.lock import inspect_lock
from billing.usage.tasks import flush_hourly_usage
from tests.factories import expected_totals
from tests.fixtures.processes import (
    recent_usage,
    settings_env,
    unit_command,
    venv_root,
    worker_queue,
)


def test_sigterm_lets_the_running_flush_finish_and_release_the_lock(
    billing_settings, billing_runtime, redis_client, emulator, processes
):
    customers, rows = recent_usage(billing_runtime)
    emulator.faults({"path": "/v1/billing/meter_events", "latency_ms": 3000, "count": 2})
    queue = worker_queue()
    settings = billing_settings.replace(billing_queue=queue)
    command = unit_command(  # the unit's own ExecStart, prefork children included
        "billing-worker.service",
        venv_root(),
        {"${STRIPE_BILLING_QUEUE}": queue, "billing-worker@%H": f"{queue}@%h"},
    )
    worker = processes.start("worker", command, settings_env(settings))
    sent = flush_hourly_usage.apply_async(queue=queue)
    deadline = time.monotonic() + 60
    while inspect_lock(redis_client, settings.flush_lock_key) is None:
        assert time.monotonic() < deadline, worker.log_path.read_text()[-2000:]
        time.sleep(0.05)

    worker.send_signal(signal.SIGTERM)  # what systemd sends (KillMode=mixed: the main process)
    result = sent.get(timeout=60)
    assert worker.wait(timeout=60) == 0
    assert result["ok"] and result["events_claimed"] == 2
    assert emulator.billed() == expected_totals(rows, customers)
    assert inspect_lock(redis_client, settings.flush_lock_key) is None
    assert "Warm shutdown" in worker.log_path.read_text()
