"""Signed webhook delivery, retries, duplicates and reordering."""

from __future__ import annotations

import json
import time

import pytest
import stripe

SECRET = "whsec_test_emulator_secret"  # conftest.WEBHOOK_SECRET


def only(emulator, *types):
    emulator.post("webhooks", {"enabled_events": list(types)})


def test_delivery_verifies_and_tampering_fails(stripe_client, emulator, webhook_receiver):
    customer = stripe_client.v1.customers.create({"email": "hook@example.com"})
    ((headers, body),) = webhook_receiver.wait_for(1)
    sig = headers["Stripe-Signature"]
    assert sig.startswith("t=") and ",v1=" in sig
    event = stripe.Webhook.construct_event(body.decode(), sig, SECRET)
    assert event.type == "customer.created"
    assert event.data.object.id == customer.id
    assert event.api_version == stripe.api_version
    assert stripe_client.v1.events.retrieve(event.id).id == event.id

    tampered = body.replace(b"hook@example.com", b"evil@example.com")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(tampered.decode(), sig, SECRET)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body.decode(), sig, "whsec_wrong")


def test_stale_signature_rejected(stripe_client, emulator, webhook_receiver):
    emulator.post("webhooks", {"timestamp_offset": -600})  # signed 10 minutes ago
    stripe_client.v1.customers.create({})
    ((headers, body),) = webhook_receiver.wait_for(1)
    with pytest.raises(stripe.SignatureVerificationError, match="tolerance"):
        stripe.Webhook.construct_event(body.decode(), headers["Stripe-Signature"], SECRET)
    # Without a tolerance the signature itself is still valid.
    stripe.WebhookSignature.verify_header(body.decode(), headers["Stripe-Signature"], SECRET)


def test_failed_delivery_is_retried_until_success(stripe_client, emulator, webhook_receiver):
    webhook_receiver.statuses = [500, 503]
    customer = stripe_client.v1.customers.create({})
    received = webhook_receiver.wait_for(1)
    assert json.loads(received[0][1])["data"]["object"]["id"] == customer.id
    emulator.flush_webhooks()
    attempts = [(d["attempt"], d["status"]) for d in emulator.get("webhooks")["deliveries"]]
    assert attempts == [(1, 500), (2, 503), (3, 200)]
    stats = emulator.stats()["webhooks"]
    assert stats["delivered"] == 1 and stats["failed_attempts"] == 2


def test_unreachable_endpoint_gives_up_after_max_attempts(stripe_client, emulator):
    emulator.post(
        "webhooks",
        {"url": "http://127.0.0.1:9/nothing", "secret": SECRET, "max_attempts": 3, "timeout_s": 1},
    )
    stripe_client.v1.customers.create({})
    assert emulator.flush_webhooks()["idle"]
    deliveries = emulator.get("webhooks")["deliveries"]
    assert [d["attempt"] for d in deliveries] == [1, 2, 3]
    assert all(d["error"] and not d["ok"] for d in deliveries)


def test_duplicate_delivery(stripe_client, emulator, webhook_receiver):
    emulator.post("webhooks", {"duplicate": True})
    stripe_client.v1.customers.create({})
    received = webhook_receiver.wait_for(2)
    ids = [json.loads(body)["id"] for _, body in received]
    assert len(ids) == 2 and ids[0] == ids[1]


def test_reverse_order(stripe_client, emulator, webhook_receiver):
    only(emulator, "customer.created")
    emulator.post("webhooks", {"order": "reverse", "hold_ms": 300})
    created = [stripe_client.v1.customers.create({"name": str(i)}).id for i in range(3)]
    webhook_receiver.wait_for(3)
    delivered = [e["data"]["object"]["id"] for e in webhook_receiver.events()]
    assert delivered == list(reversed(created))


def test_delivery_never_blocks_the_api(stripe_client, emulator, webhook_receiver):
    webhook_receiver.delay = 0.3  # a slow endpoint
    started = time.perf_counter()
    for _ in range(3):
        stripe_client.v1.customers.create({})
    assert time.perf_counter() - started < 0.3
    assert len(webhook_receiver.wait_for(3)) == 3
