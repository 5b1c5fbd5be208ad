"""Injected faults, rate ceilings and the per-(customer, meter) lock, as stripe-python sees them."""

from __future__ import annotations

import threading
import time

import pytest
import stripe
from stripe._http_client import HTTPClient

EVENTS = "/v1/billing/meter_events"
KEY = f"POST {EVENTS}"


def event(client, customer, identifier=None, value="1"):
    params = {
        "event_name": "api_calls",
        "payload": {"stripe_customer_id": customer, "value": value},
    }
    if identifier:
        params["identifier"] = identifier
    return client.v1.billing.meter_events.create(params)


@pytest.fixture
def fast_retries(monkeypatch):
    # stripe-python sleeps at least INITIAL_DELAY (0.5 s) between retries; keep tests quick.
    monkeypatch.setattr(HTTPClient, "INITIAL_DELAY", 0.01)
    monkeypatch.setattr(HTTPClient, "MAX_DELAY", 0.02)


def test_injected_429_is_not_retried(client_factory, metered, emulator, fast_retries):
    emulator.stats()  # warm
    emulator.post("stats/reset")
    emulator.fault(path=EVENTS, status=429, count=1)
    client = client_factory(retries=3)
    with pytest.raises(stripe.RateLimitError) as info:
        event(client, metered.customer.id)
    assert info.value.http_status == 429
    assert info.value.error.code == "rate_limit"
    assert "Stripe-Should-Retry" not in info.value.headers
    stats = emulator.stats()
    assert stats["requests"][KEY] == 1  # a plain 429 is never retried by the library
    assert stats["responses"][KEY] == {"429": 1}
    assert stats["meter_events"]["accepted"] == 0
    event(client, metered.customer.id)  # the fault was for one call only


def test_injected_500_is_retried_with_the_same_idempotency_key(
    client_factory, metered, emulator, fast_retries
):
    emulator.post("stats/reset")
    emulator.fault(path=EVENTS, status=500, count=1)
    ev = event(client_factory(retries=2), metered.customer.id, identifier="once")
    assert ev.identifier == "once"
    stats = emulator.stats()
    assert stats["responses"][KEY] == {"500": 1, "200": 1}
    assert stats["billed"][metered.customer.id]["api_calls"] == 1


def test_injected_500_without_retries(stripe_client, metered, emulator):
    emulator.fault(path=EVENTS, status=503, count=1)
    with pytest.raises(stripe.APIError) as info:
        event(stripe_client, metered.customer.id)
    assert info.value.http_status == 503


def test_added_latency(stripe_client, metered, emulator):
    emulator.fault(path="/v1/customers", latency_ms=150, count=1)
    started = time.perf_counter()
    stripe_client.v1.customers.retrieve(metered.customer.id)
    assert time.perf_counter() - started >= 0.15
    assert emulator.get("faults")["faults"][0]["remaining"] == 0


def test_dropped_connection(stripe_client, metered, emulator):
    emulator.fault(path=EVENTS, drop=True, count=1)
    with pytest.raises(stripe.APIConnectionError):
        event(stripe_client, metered.customer.id)
    event(stripe_client, metered.customer.id)
    assert emulator.stats()["responses"][KEY] == {"0": 1, "200": 1}


def test_lock_timeout_on_concurrent_calls_for_one_customer_and_meter(
    stripe_client, client_factory, metered, emulator
):
    other = stripe_client.v1.customers.create({"name": "other"})
    emulator.fault(path=EVENTS, latency_ms=300, count=1)  # holds the first call's lock
    done: list[object] = []
    slow_client = client_factory()
    slow = threading.Thread(target=lambda: done.append(event(slow_client, metered.customer.id)))
    slow.start()
    while emulator.stats()["requests"].get(KEY, 0) < 1:  # the slow call has arrived
        time.sleep(0.005)
    with pytest.raises(stripe.RateLimitError) as info:
        event(stripe_client, metered.customer.id)
    assert info.value.error.code == "lock_timeout"
    assert info.value.headers["Stripe-Should-Retry"] == "true"
    event(stripe_client, other.id)  # another customer is not blocked
    slow.join()
    assert len(done) == 1
    assert emulator.stats()["meter_events"]["lock_timeouts"] == 1


def test_probability_faults_are_repeatable_with_a_seed(stripe_client, emulator):
    def pattern():
        emulator.post(
            "faults",
            {"clear": True, "path": "/v1/customers", "status": 500, "probability": 0.5, "seed": 7},
        )
        outcome = []
        for _ in range(12):
            try:
                stripe_client.v1.customers.list()
                outcome.append(True)
            except stripe.APIError:
                outcome.append(False)
        return outcome

    first = pattern()
    assert first == pattern()
    assert True in first and False in first
    emulator.post("faults", {"clear": True})
    assert emulator.get("faults") == {"faults": []}


def test_rate_ceiling(stripe_client, metered, emulator):
    assert emulator.post("limits", {"preset": "test"}) == {"global": 25.0, "paths": {}}
    emulator.post("limits", {"global": 5})  # a burst of 5, then 5/s
    refused = 0
    for i in range(30):
        try:
            event(stripe_client, metered.customer.id, identifier=f"r{i}")
        except stripe.RateLimitError as err:
            assert err.error.code == "rate_limit"
            refused += 1
    assert refused >= 15
    assert emulator.stats()["requests"][KEY] == 30  # refused calls are counted too
    emulator.post("limits", {"preset": "off", "paths": {EVENTS: 5000}})
    event(stripe_client, metered.customer.id, identifier="after")
