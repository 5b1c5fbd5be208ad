"""The README's web command: gunicorn with `billing.gunicorn_conf` serving the webhook endpoint.
(That an exiting process publishes what was still waiting for its batch is shown in
test_sender.py, with a linger long enough to be sure something was.)"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import requests

from billing import gunicorn_conf, logs
from billing.config import Settings
from tests.ops.conftest import free_port
from tests.process import BIN, ROOT, billing_env
from tests.webhooks.conftest import make_event, post, queued_event_ids, rows, wait_until


@dataclass
class Served:
    url: str
    output: str = ""
    returncode: int | None = None
    stop_seconds: float | None = None  # from SIGTERM to the arbiter's exit


@contextmanager
def web_command(
    settings: Settings, workers: int, worker_class: str | None = None
) -> Iterator[Served]:
    """The README's web command on a free port, answering; stopped gracefully (SIGTERM) after.
    `worker_class` overrides billing.gunicorn_conf's, as its flag would."""
    port = free_port()
    served = Served(f"http://127.0.0.1:{port}{settings.webhook_path}")
    env = billing_env(settings, BILLING_LOG_FORMAT="json",
                      STRIPE_WEBHOOK_SECRET=settings.stripe_webhook_secret)
    override = ["--worker-class", worker_class] if worker_class else []
    server = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "python:billing.gunicorn_conf", "--workers", str(workers),
         *override, "--bind", f"127.0.0.1:{port}", "billing:create_app()"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # an unsigned POST is refused once a worker answers
            try:
                if requests.post(served.url, data=b"{}", timeout=5).status_code == 400:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up, or still loading
                pass
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.1)
        yield served
    finally:
        stopping = time.monotonic()
        server.send_signal(signal.SIGTERM)
        served.output, _ = server.communicate(timeout=60)
        served.returncode = server.returncode
        served.stop_seconds = time.monotonic() - stopping


def test_gunicorn_serves_the_endpoint_and_every_accepted_delivery_is_queued_once(
    webhook_runtime, webhook_settings, broker_client
):
    ids = [f"evt_gunicorn_{n}" for n in range(20)]
    with web_command(webhook_settings, workers=2) as served:
        answers = [post(served.url, make_event("customer.updated", event_id)) for event_id in ids]
    assert served.returncode == 0, served.output
    assert [(a.status_code, a.json()["outcome"]) for a in answers] == [(200, "accepted")] * 20
    assert sorted(queued_event_ids(broker_client, webhook_settings.billing_queue)) == sorted(ids)
    assert {r.stripe_event_id for r in rows(webhook_runtime)} == set(ids)
    accepted = [json.loads(line) for line in served.output.splitlines()
                if logs.WEBHOOK_ACCEPTED in line]
    assert sorted(record["event_id"] for record in accepted) == sorted(ids)


@pytest.mark.parametrize("worker_class", [None, "gevent"], ids=["default", "gevent"])
def test_a_delivery_waiting_on_the_database_leaves_its_worker_serving(
    webhook_runtime, webhook_settings, broker_client, worker_class
):
    """One worker answers another request while a delivery's insert waits on a table lock, then
    stores and queues that delivery: on another of its threads (the default, gthread), or
    because psycopg2 yields to gevent's hub while it waits (gevent)."""
    waiting_inserts = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND strpos(query, 'billing_insert_') > 0"
    )
    with (web_command(webhook_settings, workers=1, worker_class=worker_class) as served,
          ThreadPoolExecutor(1) as pool):
        with webhook_runtime.engine.begin() as locking:
            locking.exec_driver_sql("LOCK TABLE webhook_events IN SHARE MODE")
            delivery = pool.submit(post, served.url, make_event("customer.updated", "evt_waits"))

            def insert_waits() -> bool:
                with webhook_runtime.engine.connect() as connection:
                    return connection.exec_driver_sql(waiting_inserts).scalar_one() == 1

            wait_until(insert_waits, timeout=10, what="the delivery's insert waiting on the lock")
            assert requests.post(served.url, data=b"{}", timeout=5).status_code == 400
            assert not delivery.done()
        assert delivery.result(timeout=30).json()["outcome"] == "accepted"
    assert served.returncode == 0, served.output
    assert queued_event_ids(broker_client, webhook_settings.billing_queue) == ["evt_waits"]


@pytest.mark.parametrize("worker_class", [None, "gevent"], ids=["default", "gevent"])
def test_an_idle_keep_alive_connection_does_not_hold_a_graceful_stop(
    webhook_settings, worker_class
):
    """gunicorn's own workers wait at most `keepalive` (2 s) for a connection's next request, so
    a restart does not wait out `graceful_timeout` (30 s) for a client that keeps its
    connection open and idle. gunicorn's `gevent_pywsgi` worker waits with no limit (measured:
    30.1 s against 2.7 s; bench/webhooks-results.md)."""
    # The server stops first (contexts exit in reverse), with the client's connection still open.
    with (requests.Session() as client,
          web_command(webhook_settings, workers=1, worker_class=worker_class) as served):
        answer = client.post(served.url, data=b"{}", timeout=5)
        assert answer.status_code == 400
        assert answer.headers.get("Connection", "").lower() != "close"
    assert served.returncode == 0, served.output
    assert served.stop_seconds is not None and served.stop_seconds < 10, served.output


def test_each_worker_freezes_what_the_loaded_app_holds():
    """Full collections then skip the app's modules and objects (they cost 70 to 310 ms)."""
    try:
        gunicorn_conf.post_worker_init(worker=None)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
