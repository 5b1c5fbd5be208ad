"""Scale-out: two Celery worker processes (prefork, two children each) on one queue, against
Redis and against RabbitMQ. 2,000 webhook deliveries (1,000 events, each delivered twice) are each
processed exactly once, and hourly flushes started on both workers at once run single-flight."""

from __future__ import annotations

import contextlib
import json
import random
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import kombu
import pytest
import requests
import sqlalchemy as sa

from billing import logs
from billing.broker import make_sender
from billing.models import WebhookEvent
from billing.task_names import FLUSH_HOURLY_TASK
from tests.conftest import TEST_BROKER_URL
from tests.factories import expected_totals
from tests.fixtures.processes import (
    Processes,
    celery_worker_args,
    recent_usage,
    settings_env,
    worker_queue,
)
from tests.fixtures.webhooks import SECRET, AppServer, make_event, sign, wait_until

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
EVENTS, DELIVERIES_EACH = 1000, 2


def broker_url(kind: str) -> str:
    if kind == "redis":
        return TEST_BROKER_URL
    try:
        with kombu.Connection(AMQP_URL, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as error:  # not answering, whatever the reason
        pytest.skip(f"RabbitMQ does not answer at {AMQP_URL} ({error}); scripts/services.sh")
    return AMQP_URL


def completed_per_event(log_paths) -> Counter:
    seen: Counter = Counter()
    for path in log_paths:
        for line in path.read_text().splitlines():
            if line.startswith("{") and logs.WEBHOOK_PROCESSING_COMPLETED in line:
                seen[json.loads(line)["event_id"]] += 1
    return seen


@pytest.fixture
def queue(broker: str, processes: Processes) -> Iterator[str]:
    """The workers' queue. RabbitMQ keeps a declared queue after its consumers leave (Redis
    drops an empty list), so it is deleted once the workers have stopped."""
    name = worker_queue()
    yield name
    if broker == "rabbitmq":
        processes.stop_all()
        # Not answering (the test skipped): nothing was declared there.
        with (
            contextlib.suppress(kombu.exceptions.OperationalError),
            kombu.Connection(AMQP_URL, connect_timeout=2) as connection,
        ):
            connection.default_channel.queue_delete(name)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_two_workers_process_each_event_once_and_flush_single_flight(
    broker, queue, billing_settings, make_runtime, emulator, processes
):
    settings = billing_settings.replace(
        billing_queue=queue,
        celery_broker_url=broker_url(broker),
        stripe_webhook_secret=SECRET,
    )
    runtime = make_runtime(settings)
    env = settings_env(settings, STRIPE_WEBHOOK_SECRET=SECRET, BILLING_LOG_LEVEL="info")
    workers = [
        processes.start(f"worker-{n}", celery_worker_args(queue, "-P", "prefork", "-c", "2"), env)
        for n in (1, 2)
    ]
    server = AppServer(runtime)
    try:
        ids = [f"evt_scale_{broker}_{n:04d}" for n in range(EVENTS)]
        deliveries = [i for i in ids for _ in range(DELIVERIES_EACH)]
        random.Random(13).shuffle(deliveries)
        bodies = {
            i: make_event(
                "invoice.payment_failed",
                i,
                id=f"in_{i}",
                object="invoice",
                customer="cus_unknown",
                amount_due=100,
                currency="usd",
            )
            for i in ids
        }
        http = requests.Session()
        http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=32))

        def deliver(event_id: str) -> int:
            body = bodies[event_id]
            headers = {"Stripe-Signature": sign(body), "Content-Type": "application/json"}
            return http.post(server.url, data=body, headers=headers, timeout=60).status_code

        with ThreadPoolExecutor(max_workers=32) as pool:
            codes = Counter(pool.map(deliver, deliveries))
        assert codes == {200: EVENTS * DELIVERIES_EACH}
    finally:
        server.close()

    def processed() -> int:
        with runtime.session_factory() as session:
            return session.scalar(
                sa.select(sa.func.count()).where(WebhookEvent.status == "processed")
            )

    wait_until(lambda: processed() == EVENTS, timeout=180, what="every event processed")
    with runtime.session_factory() as session:
        rows = session.execute(sa.select(WebhookEvent.status, WebhookEvent.attempts)).all()
    assert Counter(rows) == {("processed", 1): EVENTS}  # one row each, claimed once
    seen = completed_per_event(w.log_path for w in workers)
    assert set(seen) == set(ids) and set(seen.values()) == {1}
    per_worker = [len(completed_per_event([w.log_path])) for w in workers]
    assert all(per_worker) and sum(per_worker) == EVENTS  # both workers took a share

    # Hourly flushes started on both workers at once: one runs, the others find the lock.
    customers, rows = recent_usage(runtime, minutes_ago=40)
    # Each meter event call takes 1.5 s, so the first flush still holds the lock while the
    # other three start.
    emulator.faults({"path": "/v1/billing/meter_events", "latency_ms": 1500, "count": 2})
    sender = make_sender(settings)
    sender.conf.result_backend = TEST_BROKER_URL
    try:
        sent = [sender.send_task(FLUSH_HOURLY_TASK, queue=queue) for _ in range(4)]
        results = [r.get(timeout=120) for r in sent]
    finally:
        sender.close()
    ran = [r for r in results if not r["skipped"]]
    assert len(ran) == 1 and ran[0]["ok"] and ran[0]["events_claimed"] == 2
    assert emulator.billed() == expected_totals(rows, customers)
    scheme = urllib.parse.urlsplit(settings.celery_broker_url).scheme
    assert all(f"Connected to {scheme}://" in w.log_path.read_text() for w in workers)
