"""Flower (the `ops` extra) sees the flush task run by a real worker, both started from the
systemd units' own command lines, against the test broker."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from datetime import timedelta

import pytest

from billing.models import utcnow
from billing.task_names import FLUSH_HOURLY_TASK
from billing.usage.tasks import flush_hourly_usage
from tests.factories import add_accounts, add_events
from tests.fixtures.processes import free_port, settings_env, unit_command, venv_root, wait_for_http

pytest.importorskip("flower", reason="Flower is the ops extra: pip install 'billing[ops]'")

AUTH = "ops:" + uuid.uuid4().hex


def get_json(url: str, auth: str | None = AUTH) -> object:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_flower_finds_the_flush_task_with_its_name_and_final_state(
    billing_settings, billing_runtime, emulator, processes
):
    customers = add_accounts(billing_runtime, [1])
    add_events(
        billing_runtime,
        [
            {
                "organization_id": 1,
                "event_type": "api_call",
                "quantity": 7,
                "occurred_at": utcnow() - timedelta(minutes=30),
            }
        ],
    )
    queue = f"{billing_settings.billing_queue}-flower-{uuid.uuid4().hex[:6]}"
    env = settings_env(billing_settings.replace(billing_queue=queue), FLOWER_BASIC_AUTH=AUTH)
    port = free_port()
    flower = unit_command("billing-flower.service", venv_root(), {"--port=5555": f"--port={port}"})
    assert "--address=127.0.0.1" in flower
    processes.start("flower", flower, env)
    base = f"http://127.0.0.1:{port}"
    wait_for_http(f"{base}/api/workers", auth=AUTH)
    with pytest.raises(urllib.error.HTTPError) as refused:
        get_json(f"{base}/api/workers", auth=None)
    assert refused.value.code == 401

    worker = unit_command(
        "billing-worker.service",
        venv_root(),
        {"${STRIPE_BILLING_QUEUE}": queue, "billing-worker@%H": f"{queue}@%h"},
    )
    processes.start("worker", worker, env)
    sent = flush_hourly_usage.apply_async(queue=queue)
    result = sent.get(timeout=60)
    assert result["ok"] and result["billed_value"] == {"api_call": 7}
    assert emulator.billed() == {customers[1]: {"api_call": 7}}

    deadline = time.monotonic() + 15
    while True:  # Flower learns the final state from the worker's events, a moment later
        tasks = get_json(f"{base}/api/tasks?taskname={FLUSH_HOURLY_TASK}")
        task = tasks.get(sent.id, {})  # type: ignore[union-attr]
        if task.get("state") == "SUCCESS" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert task["name"] == FLUSH_HOURLY_TASK and task["state"] == "SUCCESS"
    # Arguments carry ids at most: the flush takes none, and nothing secret reaches Flower.
    assert task["args"] in ("()", "[]") and task["kwargs"] == "{}"
    assert "sk_test" not in json.dumps(task)
