"""Usage Stripe accepts and then rejects, as an operator runs billing: the README's web command
(gunicorn) receives the emulator's thin error reports, a Celery worker process fetches and
records them, and the guide's commands (`flush_now`, `status`, `preflight`, `submissions retry`)
run as separate processes. The usage is billed exactly once after the fix."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter

import sqlalchemy as sa

from billing import accounts
from billing.models import UsageSubmission
from tests.e2e.test_web_command import web_command
from tests.factories import add_accounts, add_events, expected_totals, random_events
from tests.fixtures.processes import (
    celery_worker_args,
    free_port,
    settings_env,
    wait_for_http,
    worker_queue,
)
from tests.fixtures.webhooks import OLD_SECRET, SECRET, wait_until
from tests.process import billing_env, run_flask
from tests.test_metrics import samples

DELAY = 1
CODE = "meter_event_customer_not_found"


def _rows(runtime) -> list[UsageSubmission]:
    with runtime.session_factory() as session:
        return list(session.scalars(sa.select(UsageSubmission).order_by(UsageSubmission.id)))


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return samples(response.read().decode())


def test_rejected_usage_reaches_the_operator_and_is_billed_once_after_the_fix(
    webhook_settings, webhook_runtime, emulator, processes, tmp_path
):
    runtime = webhook_runtime
    queue, metrics_port = worker_queue(), free_port()
    settings = webhook_settings.replace(billing_queue=queue)
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    processes.start(
        "worker",
        celery_worker_args(queue, "-P", "prefork", "-c", "2"),
        settings_env(
            settings,
            PROMETHEUS_MULTIPROC_DIR=str(multiproc),
            BILLING_WORKER_METRICS_PORT=str(metrics_port),
        ),
    )
    worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_for_http(worker_metrics)
    emulator.settings(
        meter_validation="async", error_report_delay_seconds=DELAY, error_report_samples=100
    )
    customers = add_accounts(runtime, [11, 12])
    usage = random_events([11, 12], ["api_call", "storage_gb_hour"], 40, hours=4)
    add_events(runtime, usage)
    runtime.stripe.client.v1.customers.delete(customers[11])
    env = billing_env(settings, BILLING_LOG_FORMAT="json")

    with web_command(settings, workers=2) as served:
        # Snapshot and thin events come from separate destinations, with their own secrets.
        emulator.control(
            "POST",
            "webhooks",
            {"url": served.url, "secret": SECRET, "thin_secret": OLD_SECRET, "backoff_ms": 20},
        )
        try:
            sent = run_flask(env, "flush_now")
            assert sent.returncode == 0, sent.stderr  # every event answered 200
            deleted = {r.id for r in _rows(runtime) if r.organization_id == 11}
            wait_until(
                lambda: {r.id for r in _rows(runtime) if r.status == "rejected"} == deleted,
                30,
                "the worker process to mark the rows rejected",
            )
            status = run_flask(env, "status", "--json")
            assert json.loads(status.stdout)["outbox_by_status"]["rejected"] == len(deleted)
            preflight = json.loads(run_flask(env, "preflight", "--json").stdout)
            (outbox,) = [c for c in preflight["checks"] if c["check"] == "usage_outbox"]
            assert outbox["status"] == "fail" and f"{len(deleted)} rejected" in outbox["detail"]
            # A scrape that could not read the database says so (billing_state_up 0, no gauges):
            # on a loaded machine take the next one.
            web = wait_until(
                lambda: (
                    (found := _scrape(served.metrics_url))[("billing_state_up", ())] == 1 and found
                ),
                30,
                "a scrape that reads the database",
            )
            assert web[("billing_outbox_rows", (("status", "rejected"),))] == len(deleted)
            worker = _scrape(worker_metrics)
            assert worker[("billing_meter_events_rejected_total", (("code", CODE),))] == len(
                deleted
            )
            waiting = run_flask(env, "flush_now")
            assert waiting.returncode == 1  # rows wait for an operator

            customers[11] = runtime.stripe.create_customer("Org 11 again", 11).id
            accounts.link_account(runtime, 11, customers[11], None)
            retried = run_flask(
                env, "submissions", "retry", "--status", "rejected", "--org-id", "11"
            )
            assert retried.returncode == 0, retried.stderr
            assert sorted(json.loads(retried.stdout)["submission_ids"]) == sorted(deleted)
            billed = run_flask(env, "flush_now")
            assert billed.returncode == 0, billed.stderr
            time.sleep(DELAY + 1)  # a report of anything refused again would have arrived
            assert emulator.control("POST", "webhooks/flush", {"timeout": 30})["idle"]
        finally:
            emulator.control("POST", "webhooks", {"url": None})
    assert served.returncode == 0, served.output

    assert {r.status for r in _rows(runtime)} == {"sent"}
    table: dict[str, Counter] = {}
    for row in _rows(runtime):
        table.setdefault(row.stripe_customer_id, Counter())[row.event_name] += row.value
    assert emulator.billed() == {c: dict(v) for c, v in table.items()}
    assert emulator.billed() == expected_totals(usage, customers)
