"""The scheduled contract check: beat runs it at minute 3; a worker logs and counts failures."""

from __future__ import annotations

import time
import urllib.request

import celeryconfig
from billing.celery_app import celery_app
from billing.checks.tasks import validate_contract
from billing.ops.state import read_run_records
from billing.task_names import VALIDATE_CONTRACT_TASK
from tests.fixtures.processes import (
    CONTRACT_BREAKING_CHECKS,
    celery_worker_args,
    contract_breaking_usage,
    free_port,
    settings_env,
    wait_for_http,
    worker_queue,
)
from tests.test_celery_app import is_due
from tests.test_metrics import samples

ENTRY = celeryconfig.beat_schedule["billing-contract-validate"]


def test_beat_runs_the_check_at_minute_3_before_the_flush_at_13():
    assert not is_due(ENTRY, "2026-11-25T14:02:59", "2026-11-25T13:03:00")
    assert is_due(ENTRY, "2026-11-25T14:03:00", "2026-11-25T13:03:00")
    assert ENTRY["task"] == VALIDATE_CONTRACT_TASK and VALIDATE_CONTRACT_TASK in celery_app.tasks
    assert ENTRY["options"]["queue"] == celery_app.conf.task_default_queue


def test_worker_logs_and_counts_a_failed_check(billing_runtime, emulator, processes, tmp_path):
    contract_breaking_usage(billing_runtime)
    queue, port = worker_queue(), free_port()
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    env = settings_env(
        billing_runtime.settings.replace(billing_queue=queue),
        STRIPE_BILLING_CONTRACT_FAIL_CLOSED="1",
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
        BILLING_WORKER_METRICS_PORT=str(port),
    )
    worker = processes.start("worker", celery_worker_args(queue, "-P", "prefork", "-c", "1"), env)
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for_http(url)
    validate_contract.apply_async(queue=queue)
    deadline = time.monotonic() + 60
    scraped: dict = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=10) as response:
            scraped = samples(response.read().decode())
        if scraped.get(("billing_contract_validations_total", (("result", "failed"),))):
            break
        time.sleep(0.3)
    key = ("billing_contract_validations_total", (("result", "failed"),))
    assert scraped.get(key) == 1, worker.log_path.read_text()[-3000:]
    for check in CONTRACT_BREAKING_CHECKS:
        assert scraped[("billing_contract_check_failures_total", (("check", check),))] == 1
    assert ("billing_contract_check_failures_total", (("check", "table_columns"),)) not in scraped
    log = worker.log_path.read_text()
    assert "Stripe billable_events contract validation failed" in log
    assert "blocks_flush" in log or "'blocks_flush': True" in log
    # Recorded for the web app's scrape and `status`, which the worker's counters never reach.
    _, validation = read_run_records(billing_runtime)
    assert validation["source"] == "schedule" and not validation["ok"]
    assert sorted(validation["failed_checks"]) == sorted(CONTRACT_BREAKING_CHECKS)
