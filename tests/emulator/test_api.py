"""Core API behaviour, driven through stripe-python only."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest
import stripe


class TestObjects:
    def test_customer_meter_price_subscription(self, stripe_client, metered):
        assert metered.customer.id.startswith("cus_")
        assert metered.customer.livemode is False
        assert metered.meter.id.startswith("mtr_")
        assert metered.meter.status == "active"
        assert metered.meter.customer_mapping.event_payload_key == "stripe_customer_id"
        assert metered.price.recurring.usage_type == "metered"
        assert metered.price.recurring.meter == metered.meter.id

        sub = stripe_client.v1.subscriptions.retrieve(metered.subscription.id)
        assert sub.id.startswith("sub_") and sub.status == "active"
        item = sub["items"].data[0]
        assert item.id.startswith("si_")
        assert item.price.id == metered.price.id
        # API 2026-10-28 layout: the period is on the items, not on the subscription.
        assert item.current_period_start <= sub.created < item.current_period_end
        assert "current_period_end" not in sub.to_dict()
        listed = stripe_client.v1.subscriptions.list({"customer": metered.customer.id})
        assert [s.id for s in listed.data] == [sub.id]

    def test_update_customer_metadata_and_list_pagination(self, stripe_client):
        ids = [stripe_client.v1.customers.create({"name": f"c{i}"}).id for i in range(5)]
        updated = stripe_client.v1.customers.update(ids[0], {"metadata": {"org": "42"}})
        assert updated.metadata.to_dict() == {"org": "42"}
        page = stripe_client.v1.customers.list({"limit": 2})
        assert page.has_more and len(page.data) == 2
        assert page.data[0].id == ids[-1]  # newest first
        assert [c.id for c in page.auto_paging_iter()] == list(reversed(ids))

    def test_expand(self, stripe_client, metered):
        sub = stripe_client.v1.subscriptions.retrieve(
            metered.subscription.id, {"expand": ["customer", "latest_invoice"]}
        )
        assert sub.customer.email == "ops@example.com"
        assert sub.latest_invoice.billing_reason == "subscription_create"
        assert sub.latest_invoice.parent.subscription_details.subscription == sub.id

    @pytest.mark.usefixtures("sync_meter_validation")
    def test_meter_deactivate_refuses_events(self, stripe_client, metered):
        stripe_client.v1.billing.meters.deactivate(metered.meter.id)
        with pytest.raises(stripe.InvalidRequestError, match="inactive"):
            stripe_client.v1.billing.meter_events.create(
                {
                    "event_name": "api_calls",
                    "payload": {"stripe_customer_id": metered.customer.id, "value": "1"},
                }
            )
        assert stripe_client.v1.billing.meters.reactivate(metered.meter.id).status == "active"


class TestMeterEvents:
    def send(self, client, customer, value="1", **extra):
        params = {
            "event_name": "api_calls",
            "payload": {"stripe_customer_id": customer, "value": value},
            **extra,
        }
        return client.v1.billing.meter_events.create(params)

    def test_summaries_by_hour(self, stripe_client, metered, emulator):
        hour = (emulator.now() // 3600 - 3) * 3600  # three whole hours ago
        for offset, value in ((10, "5"), (20, "7"), (3600 + 5, "11"), (2 * 3600 + 1, "1")):
            ev = self.send(stripe_client, metered.customer.id, value, timestamp=hour + offset)
            assert ev.object == "billing.meter_event" and ev.timestamp == hour + offset
        grouped = stripe_client.v1.billing.meters.event_summaries.list(
            metered.meter.id,
            {
                "customer": metered.customer.id,
                "start_time": hour,
                "end_time": hour + 3 * 3600,
                "value_grouping_window": "hour",
            },
        )
        assert [(s.start_time - hour, s.aggregated_value) for s in grouped.data] == [
            (7200, 1.0),
            (3600, 11.0),
            (0, 12.0),
        ]
        assert all(s.object == "billing.meter_event_summary" for s in grouped.data)
        total = stripe_client.v1.billing.meters.event_summaries.list(
            metered.meter.id,
            # end_time is exclusive: the event at hour+7201 is left out
            {"customer": metered.customer.id, "start_time": hour, "end_time": hour + 7200},
        )
        assert [s.aggregated_value for s in total.data] == [23.0]
        with pytest.raises(stripe.InvalidRequestError, match="aligned"):
            stripe_client.v1.billing.meters.event_summaries.list(
                metered.meter.id,
                {
                    "customer": metered.customer.id,
                    "start_time": hour + 60,
                    "end_time": hour + 7200,
                    "value_grouping_window": "hour",
                },
            )

    def test_duplicate_identifier_not_counted_twice(self, stripe_client, metered, emulator):
        cus = metered.customer.id
        self.send(stripe_client, cus, "4", identifier="req-1")
        with pytest.raises(stripe.InvalidRequestError) as info:
            self.send(stripe_client, cus, "4", identifier="req-1")
        assert "An event already exists with identifier" in info.value.user_message
        assert info.value.http_status == 400
        assert info.value.headers["Stripe-Should-Retry"] == "false"
        stats = emulator.stats()
        assert stats["billed"][cus]["api_calls"] == 4
        assert stats["meter_events"]["accepted"] == 1
        assert stats["meter_events"]["duplicates"] == 1
        # After 24 h of emulator time the identifier may be used again.
        emulator.advance(86_400 + 1)
        self.send(stripe_client, cus, "4", identifier="req-1")
        assert emulator.stats()["billed"][cus]["api_calls"] == 8

    @pytest.mark.usefixtures("sync_meter_validation")
    def test_timestamp_window(self, stripe_client, metered, emulator):
        now = emulator.now()
        cus = metered.customer.id
        with pytest.raises(stripe.InvalidRequestError, match="35 days"):
            self.send(stripe_client, cus, timestamp=now - 36 * 86_400)
        with pytest.raises(stripe.InvalidRequestError, match="5 minutes"):
            self.send(stripe_client, cus, timestamp=now + 6 * 60)
        self.send(stripe_client, cus, timestamp=now + 4 * 60)
        self.send(stripe_client, cus, timestamp=now - 34 * 86_400)
        assert emulator.stats()["meter_events"] == {
            "accepted": 2,
            "duplicates": 0,
            "rejected": 2,
            "rejected_async": 0,
            "error_reports": 0,
            "canceled": 0,
            "lock_timeouts": 0,
        }

    @pytest.mark.usefixtures("sync_meter_validation")
    @pytest.mark.parametrize(
        ("payload", "match"),
        [
            ({"stripe_customer_id": "cus_nope", "value": "1"}, "No such customer"),
            ({"stripe_customer_id": "CUS", "value": "1.5"}, "whole number"),
            ({"value": "1"}, "stripe_customer_id"),
        ],
    )
    def test_payload_validation(self, stripe_client, metered, payload, match):
        payload = {k: (metered.customer.id if v == "CUS" else v) for k, v in payload.items()}
        with pytest.raises(stripe.InvalidRequestError, match=match):
            stripe_client.v1.billing.meter_events.create(
                {"event_name": "api_calls", "payload": payload}
            )

    @pytest.mark.usefixtures("sync_meter_validation")
    def test_unknown_event_name(self, stripe_client, metered):
        with pytest.raises(stripe.InvalidRequestError, match="No active meter"):
            stripe_client.v1.billing.meter_events.create(
                {
                    "event_name": "nope",
                    "payload": {"stripe_customer_id": metered.customer.id, "value": "1"},
                }
            )

    def test_cancel_adjustment(self, stripe_client, metered, emulator):
        cus = metered.customer.id
        self.send(stripe_client, cus, "9", identifier="oops")
        self.send(stripe_client, cus, "4", identifier="fine")
        cancel = {"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "oops"}}
        adj = stripe_client.v1.billing.meter_event_adjustments.create(cancel)
        # Stripe's v1 shape: no id, no created; `pending` (the emulator applies it at once).
        assert adj.to_dict() == {
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": "oops"},
            "event_name": "api_calls",
            "livemode": False,
            "status": "pending",
            "type": "cancel",
        }
        again = stripe_client.v1.billing.meter_event_adjustments.create(cancel)
        assert again.to_dict() == adj.to_dict()  # a re-cancel answers the same ...
        stats = emulator.stats()
        assert stats["billed"][cus]["api_calls"] == 4  # ... and subtracts once
        assert stats["meter_events"]["canceled"] == 1
        now = emulator.now()
        end = now - now % 60 + 60
        summary = stripe_client.v1.billing.meters.event_summaries.list(
            metered.meter.id, {"customer": cus, "start_time": end - 3600, "end_time": end}
        )
        assert summary.data[0].aggregated_value == 4.0

    def test_cancel_of_unknown_mismatched_or_expired_identifiers(
        self, stripe_client, metered, emulator
    ):
        def cancel(identifier, event_name="api_calls"):
            with pytest.raises(stripe.InvalidRequestError) as refused:
                stripe_client.v1.billing.meter_event_adjustments.create(
                    {
                        "event_name": event_name,
                        "type": "cancel",
                        "cancel": {"identifier": identifier},
                    }
                )
            assert refused.value.http_status == 400
            assert refused.value.param == "cancel[identifier]"
            return refused.value

        other = stripe_client.v1.billing.meters.create(
            {"display_name": "O", "event_name": "other", "default_aggregation": {"formula": "sum"}}
        )
        assert other.event_name == "other"
        self.send(stripe_client, metered.customer.id, "5", identifier="old")
        never = cancel("never-sent")
        assert never.code == "resource_missing" and "never-sent" in never.user_message
        assert cancel("old", "other").code == "resource_missing"  # another meter's event name
        emulator.advance(86_400 + 1)
        expired = cancel("old")
        assert expired.code is None
        assert "within 24 hours" in expired.user_message
        assert cancel("old", "other").code == "resource_missing"
        assert emulator.stats()["billed"][metered.customer.id]["api_calls"] == 5

    @pytest.mark.parametrize("mode", ["async", "sync"])
    def test_negative_values_correct_earlier_usage(self, stripe_client, metered, emulator, mode):
        emulator.post("settings", {"meter_validation": mode})
        cus = metered.customer.id
        hour = (emulator.now() // 3600 - 2) * 3600
        self.send(stripe_client, cus, "10", timestamp=hour + 10)
        self.send(stripe_client, cus, "-3", timestamp=hour + 20)
        self.send(stripe_client, cus, "-5", timestamp=hour + 3600 + 5)
        assert emulator.stats()["billed"] == {cus: {"api_calls": 2}}
        grouped = stripe_client.v1.billing.meters.event_summaries.list(
            metered.meter.id,
            {
                "customer": cus,
                "start_time": hour,
                "end_time": hour + 7200,
                "value_grouping_window": "hour",
            },
        )
        # A window whose total is negative is listed too.
        assert [(s.start_time - hour, s.aggregated_value) for s in grouped.data] == [
            (3600, -5.0),
            (0, 7.0),
        ]
        for bad in ("-", "--1", "+1", "1e3", "\u0661"):  # the last: a non-ASCII digit
            if mode == "sync":
                with pytest.raises(stripe.InvalidRequestError, match="whole number"):
                    self.send(stripe_client, cus, bad)
            else:
                self.send(stripe_client, cus, bad)
        stats = emulator.stats()
        assert stats["billed"] == {cus: {"api_calls": 2}}
        refused = stats["meter_events"]["rejected" if mode == "sync" else "rejected_async"]
        assert refused == 5

    def test_a_negative_period_total_invoices_quantity_zero(self, stripe_client, metered, emulator):
        item = metered.subscription["items"].data[0]
        self.send(stripe_client, metered.customer.id, "40", timestamp=emulator.now())
        self.send(stripe_client, metered.customer.id, "-90", timestamp=emulator.now())
        emulator.advance(item.current_period_end - emulator.now() + 10)
        (draft,) = stripe_client.v1.invoices.list(
            {"subscription": metered.subscription.id, "status": "draft"}
        ).data
        line = draft.lines.data[0]
        assert (line.quantity, line.amount, draft.amount_due) == (0, 0, 0)


class TestStrictness:
    def test_unknown_parameter(self, stripe_client):
        with pytest.raises(stripe.InvalidRequestError) as info:
            stripe_client.v1.customers.create({"emial": "x@example.com"})
        assert "Received unknown parameter: emial" in info.value.user_message
        assert info.value.param == "emial"

    def test_unknown_nested_parameter(self, stripe_client, metered):
        with pytest.raises(
            stripe.InvalidRequestError, match=r"Received unknown parameter: recurring\[usage\]"
        ):
            stripe_client.v1.prices.create(
                {
                    "currency": "usd",
                    "unit_amount": 5,
                    "product": metered.product.id,
                    "recurring": {"interval": "month", "usage": "metered"},
                }
            )

    def test_missing_object_is_404(self, stripe_client):
        with pytest.raises(stripe.InvalidRequestError) as info:
            stripe_client.v1.customers.retrieve("cus_missing")
        assert info.value.http_status == 404 and info.value.code == "resource_missing"

    def test_idempotent_replay_and_mismatch(self, stripe_client):
        first = stripe_client.v1.customers.create({"name": "A"}, {"idempotency_key": "k-1"})
        again = stripe_client.v1.customers.create({"name": "A"}, {"idempotency_key": "k-1"})
        assert again.id == first.id
        assert again.last_response.headers["Idempotent-Replayed"] == "true"
        with pytest.raises(stripe.IdempotencyError):
            stripe_client.v1.customers.create({"name": "B"}, {"idempotency_key": "k-1"})
        assert len(stripe_client.v1.customers.list().data) == 1

    def test_live_key_refused(self, client_factory):
        client = client_factory(key="sk_live_" + "123456789")
        with pytest.raises(stripe.AuthenticationError, match="live"):
            client.v1.customers.list()

    @pytest.mark.parametrize(
        ("key", "shown"),
        [
            ("pk_test_" + "AbCdEfGhIjKlMnOpQrSt1234", "pk_test_****1234"),
            ("sk_tst_12345", "sk_****"),  # short: not one character of it
            ("sk_test1234", "sk_****"),
            ("hunter2", "****"),
            ("mykey" + "x" * 20 + "9876", "****9876"),
        ],
    )
    def test_an_invalid_key_is_echoed_masked_as_stripe_does(self, client_factory, key, shown):
        """Stripe's `Invalid API Key provided: sk_test_****1234`: the prefix and at most the
        last four, so a short key is never echoed almost whole into someone's logs."""
        client = client_factory(key=key)
        with pytest.raises(stripe.AuthenticationError) as refused:
            client.v1.customers.list()
        assert refused.value.user_message == f"Invalid API Key provided: {shown}"

    def test_missing_key_refused(self, stripe_emulator):
        parts = urlsplit(stripe_emulator.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        conn.request("GET", "/v1/customers")
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 401
        assert body["error"]["type"] == "invalid_request_error"
        assert "API key" in body["error"]["message"]


def test_count_meter_with_custom_customer_key(stripe_client, emulator):
    cus = stripe_client.v1.customers.create({})
    meter = stripe_client.v1.billing.meters.create(
        {
            "display_name": "Logins",
            "event_name": "logins",
            "default_aggregation": {"formula": "count"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "account"},
        }
    )
    for _ in range(3):
        stripe_client.v1.billing.meter_events.create(
            {"event_name": "logins", "payload": {"account": cus.id}}
        )
    now = emulator.now()
    summary = stripe_client.v1.billing.meters.event_summaries.list(
        meter.id,
        {"customer": cus.id, "start_time": now - now % 60 - 3600, "end_time": now - now % 60 + 60},
    )
    assert summary.data[0].aggregated_value == 3.0


def test_idempotency_keys_expire_after_24h(stripe_client, emulator):
    first = stripe_client.v1.customers.create({"name": "A"}, {"idempotency_key": "day"})
    emulator.advance(86_400 + 1)
    second = stripe_client.v1.customers.create({"name": "B"}, {"idempotency_key": "day"})
    assert second.id != first.id and second.name == "B"
