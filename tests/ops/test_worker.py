"""A real `celery worker` process logs the guide's messages as JSON lines with the bound fields."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from billing.celery_app import celery_app
from billing.models import utcnow
from billing.task_names import FLUSH_HOURLY_TASK
from tests.factories import add_accounts, add_events, expected_totals
from tests.process import BIN, ROOT, billing_env

METER_EVENTS = "/v1/billing/meter_events"
CELERY_WORKER = [str(BIN / "celery"), "-A", "billing.celery_app", "worker", "--without-mingle"]


class WorkerProcess:
    def __init__(self, env: dict[str, str], queue: str, log_path: Path) -> None:
        self.queue = queue
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [*CELERY_WORKER, "-Q", queue, "--pool", "solo", "--loglevel", "INFO"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def lines(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if line.strip()]

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]

    def wait_for(self, message: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(message in line for line in self.lines()) >= count:
                return
            assert self.process.poll() is None, "worker exited:\n" + "\n".join(self.lines())
            time.sleep(0.1)
        raise AssertionError(f"no {message!r} within {timeout}s:\n" + "\n".join(self.lines()))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def worker_process(billing_runtime, tmp_path):
    queue = f"billing-worker-proc-{uuid.uuid4().hex[:8]}"
    env = billing_env(
        billing_runtime.settings.replace(billing_queue=queue),
        STRIPE_BILLING_TASK_MAX_RETRIES="0",
        BILLING_LOG_LEVEL="info",
    )
    worker = WorkerProcess(env, queue, tmp_path / "worker.log")
    yield worker
    worker.stop()


def _send(queue: str) -> None:
    celery_app.send_task(FLUSH_HOURLY_TASK, queue=queue, ignore_result=True)


def test_worker_logs_the_guides_messages_as_json_with_task_and_usage_fields(
    billing_runtime, emulator, worker_process
):
    customers = add_accounts(billing_runtime, [1, 2])
    rows = [
        {
            "organization_id": org,
            "event_type": "api_call",
            "quantity": 5 * org,
            "occurred_at": utcnow() - timedelta(hours=1),
        }
        for org in (1, 2)
    ]
    add_events(billing_runtime, rows)

    # First run: Stripe refuses every call, so the submit-failed lines the guide alerts on appear.
    emulator.faults({"path": METER_EVENTS, "status": 429, "count": 100_000})
    _send(worker_process.queue)
    worker_process.wait_for("Stripe usage flush completed")
    emulator.faults({"clear": True})
    # Second run: the rows left pending are billed.
    _send(worker_process.queue)
    worker_process.wait_for("Stripe usage flush completed", count=2)
    assert worker_process.stop() == 0

    records = worker_process.records()  # every line of the worker's stderr is JSON
    assert emulator.billed() == expected_totals(rows, customers)
    by_message: dict[str, list[dict]] = {}
    for record in records:
        by_message.setdefault(record["message"], []).append(record)
    task_ids = {r["task_id"] for r in by_message["Stripe usage flush started"]}
    assert len(task_ids) == 2
    for message in (
        "Stripe usage flush started",
        "Stripe usage flush batch started",
        "Stripe meter event submit attempt",
        "Stripe meter event submit failed",
        "Stripe meter event submit succeeded",
        "Stripe usage flush completed",
    ):
        assert by_message.get(message), f"no {message!r} line"
        for record in by_message[message]:
            assert record["task_id"] in task_ids and record["task_name"] == FLUSH_HOURLY_TASK
            assert record["level"] in ("INFO", "WARNING", "ERROR") and "timestamp" in record
    for message in ("Stripe meter event submit failed", "Stripe meter event submit succeeded"):
        for record in by_message[message]:
            assert record["organization_id"] in (1, 2)
            assert record["idempotency_key"].startswith("billing-")
    # Celery's own lines are JSON too, and stripe-python's per-request INFO lines are off.
    assert any(r["logger"].startswith("celery") for r in records)
    assert not [r for r in records if r["logger"].startswith("stripe")]
    assert not any("Request to Stripe api" in line for line in worker_process.lines())


def test_beat_logs_json_lines_too(settings, tmp_path):
    import redis

    queue = f"billing-beat-proc-{uuid.uuid4().hex[:8]}"
    env = billing_env(settings.replace(billing_queue=queue), BILLING_LOG_LEVEL="info")
    log_path = tmp_path / "beat.log"
    with log_path.open("w") as log:
        beat = subprocess.Popen(
            [str(BIN / "celery"), "-A", "billing.celery_app", "beat", "--loglevel", "INFO",
             "-s", str(tmp_path / "schedule")],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while "beat: Starting" not in log_path.read_text() and time.monotonic() < deadline:
                assert beat.poll() is None, log_path.read_text()
                time.sleep(0.1)
        finally:
            beat.terminate()
            beat.wait(timeout=20)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert any(
        r["logger"] == "celery.beat" and r["message"] == "beat: Starting..." for r in records
    )
    broker = redis.Redis.from_url(settings.celery_broker_url)
    broker.delete(queue)  # whatever beat sent at start-up (the webhook sweep) goes with it
    broker.close()
