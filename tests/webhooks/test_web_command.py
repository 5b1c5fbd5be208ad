"""The README's web command: gunicorn with `billing.gunicorn_conf` serving the webhook endpoint.
(That an exiting process publishes what was still waiting for its batch is shown in
test_sender.py, with a linger long enough to be sure something was.)"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import time

import requests

from billing import gunicorn_conf, logs
from tests.ops.conftest import free_port
from tests.process import BIN, ROOT, billing_env
from tests.webhooks.conftest import make_event, post, queued_event_ids, rows


def test_gunicorn_serves_the_endpoint_and_every_accepted_delivery_is_queued_once(
    webhook_runtime, webhook_settings, broker_client
):
    port = free_port()
    url = f"http://127.0.0.1:{port}{webhook_settings.webhook_path}"
    env = billing_env(webhook_settings, BILLING_LOG_FORMAT="json",
                      STRIPE_WEBHOOK_SECRET=webhook_settings.stripe_webhook_secret)
    server = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "python:billing.gunicorn_conf", "--workers", "2",
         "--bind", f"127.0.0.1:{port}", "billing:create_app()"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # an unsigned POST is refused once a worker answers
            try:
                if requests.post(url, data=b"{}", timeout=5).status_code == 400:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up, or still loading
                pass
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.1)
        ids = [f"evt_gunicorn_{n}" for n in range(20)]
        answers = [post(url, make_event("customer.updated", event_id)) for event_id in ids]
    finally:
        server.send_signal(signal.SIGTERM)  # at once: a graceful stop
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output
    assert [(a.status_code, a.json()["outcome"]) for a in answers] == [(200, "accepted")] * 20
    assert sorted(queued_event_ids(broker_client, webhook_settings.billing_queue)) == sorted(ids)
    assert {r.stripe_event_id for r in rows(webhook_runtime)} == set(ids)
    accepted = [json.loads(line) for line in output.splitlines()
                if logs.WEBHOOK_ACCEPTED in line]
    assert sorted(record["event_id"] for record in accepted) == sorted(ids)


def test_each_worker_freezes_what_the_loaded_app_holds():
    """Full collections then skip the app's modules and objects (they cost 70 to 310 ms)."""
    try:
        gunicorn_conf.post_worker_init(worker=None)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
