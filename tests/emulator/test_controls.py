"""Test controls that set up state in bulk, driven over HTTP as a benchmark calls them."""

from __future__ import annotations

import json
import time
import urllib.error

import pytest


class TestBulkCustomers:
    def test_numbered_customers_are_real_customers(self, emulator, stripe_client, metered):
        made = emulator.post(
            "customers",
            {
                "count": 3,
                "start": 41,
                "name": "Org {n}",
                "metadata": {"organization_id": "{n}", "plan": "bench"},
            },
        )
        assert made["count"] == 3 and len(set(made["ids"])) == 3
        last = stripe_client.v1.customers.retrieve(made["ids"][2])
        assert last.name == "Org 43"
        assert last.metadata.to_dict() == {"organization_id": "43", "plan": "bench"}
        # Billable like any customer: a meter event for one is aggregated for it.
        stripe_client.v1.billing.meter_events.create(
            {
                "event_name": "api_calls",
                "payload": {"stripe_customer_id": made["ids"][0], "value": "7"},
                "identifier": "bulk-1",
                "timestamp": int(time.time()) - 60,
            }
        )
        assert emulator.stats()["billed"][made["ids"][0]] == {"api_calls": 7}
        listed = stripe_client.v1.customers.list({"limit": 100})
        assert {c.id for c in listed.data} == {*made["ids"], metered.customer.id}

    def test_a_large_count_is_one_quick_call_without_events(self, emulator):
        events_before = emulator.stats()["events"]
        started = time.monotonic()
        made = emulator.post("customers", {"count": 50_000})
        seconds = time.monotonic() - started
        assert made["count"] == 50_000 and len(set(made["ids"])) == 50_000
        assert emulator.stats()["events"] == events_before  # no customer.created per customer
        assert seconds < 30  # through the API: minutes (one request per customer)

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({}, "count"),
            ({"count": 0}, "count"),
            ({"count": 1_000_001}, "count"),
            ({"count": True}, "count"),
            ({"count": 2, "start": "1"}, "start"),
            ({"count": 2, "metadata": {"org": 1}}, "metadata"),
            ({"count": 2, "email": "x@example.com"}, "email"),
        ],
    )
    def test_a_bad_body_creates_nothing(self, emulator, stripe_client, body, param):
        with pytest.raises(urllib.error.HTTPError) as refused:
            emulator.post("customers", body)
        assert refused.value.code == 400
        assert json.loads(refused.value.read())["error"]["param"] == param
        assert stripe_client.v1.customers.list({"limit": 1}).data == []
