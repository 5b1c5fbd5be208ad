"""Meter events validated asynchronously (the default, as on live Stripe): a 200 now, the failed
ones never aggregated, a signed thin error report later, its details from GET /v2/core/events;
summaries that lag. Driven through stripe-python over HTTP."""

from __future__ import annotations

import json
import re
import urllib.error
from datetime import datetime

import pytest
import stripe
from stripe.events import (
    V1BillingMeterErrorReportTriggeredEvent,
    V1BillingMeterErrorReportTriggeredEventNotification,
    V1BillingMeterNoMeterFoundEvent,
    V1BillingMeterNoMeterFoundEventNotification,
)

from billing.emulator import EmulatorServer
from tests.emulator.conftest import WEBHOOK_SECRET, Controls, Receiver

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
THIN_KEYS = {"id", "object", "context", "created", "livemode", "reason", "related_object", "type"}
REPORT_TYPES = ["v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"]
DELAY = 5  # the emulator's default --error-report-delay-seconds


def send(client, event_name="api_calls", key=None, **payload_and_params):
    params = {"event_name": event_name, "payload": {}}
    for name, value in payload_and_params.items():
        if name in ("identifier", "timestamp"):
            params[name] = value
        else:
            params["payload"][name] = value
    options = {"idempotency_key": key} if key else {}
    return client.v1.billing.meter_events.create(params, options)


def thin_deliveries(receiver: Receiver) -> list[tuple[dict[str, str], bytes]]:
    return [(h, b) for h, b in receiver.received if json.loads(b)["object"] == "v2.core.event"]


def wait_reports(emulator: Controls, receiver: Receiver, count: int) -> list:
    """Advance the clock past the report delay; the thin deliveries once `count` arrived."""
    emulator.advance(DELAY + 1)
    emulator.flush_webhooks()
    reports = thin_deliveries(receiver)
    assert len(reports) == count, [json.loads(b)["type"] for _, b in reports]
    return reports


def total(client, meter, customer, emulator, lookback=3600):
    now = emulator.now()
    end = now - now % 60 + 60
    summaries = client.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": customer, "start_time": end - lookback, "end_time": end}
    )
    return summaries.data[0].aggregated_value


@pytest.fixture
def reports_only(emulator, webhook_receiver):
    """The receiver gets the two meter error reports only (no snapshot events)."""
    emulator.post("webhooks", {"enabled_events": REPORT_TYPES})
    return webhook_receiver


@pytest.fixture
def gone_customer(stripe_client):
    cus = stripe_client.v1.customers.create({"email": "gone@example.com"})
    stripe_client.v1.customers.delete(cus.id)
    return cus.id


# (case, event name, payload and timestamp offset, expected code); CUS/GONE are filled in.
CASES = [
    ("deleted customer", "api_calls", {"stripe_customer_id": "GONE", "value": "3"},
     "meter_event_customer_not_found"),
    ("unknown customer", "api_calls", {"stripe_customer_id": "cus_nope", "value": "3"},
     "meter_event_customer_not_found"),
    ("no customer key", "api_calls", {"value": "3"}, "meter_event_no_customer_defined"),
    ("fractional value", "api_calls", {"stripe_customer_id": "CUS", "value": "1.5"},
     "meter_event_invalid_value"),
    ("missing value", "api_calls", {"stripe_customer_id": "CUS"}, "meter_event_invalid_value"),
    ("36 days old", "api_calls",
     {"stripe_customer_id": "CUS", "value": "3", "timestamp": -36 * 86_400},
     "timestamp_too_far_in_past"),
    ("6 minutes ahead", "api_calls",
     {"stripe_customer_id": "CUS", "value": "3", "timestamp": 6 * 60}, "timestamp_in_future"),
    ("archived meter", "INACTIVE", {"stripe_customer_id": "CUS", "value": "3"}, "archived_meter"),
]  # fmt: skip


class TestAsyncRejection:
    @pytest.mark.parametrize(
        ("case", "event_name", "given", "code"), CASES, ids=[c[0] for c in CASES]
    )
    def test_answered_200_not_aggregated_then_reported(
        self, stripe_client, metered, emulator, reports_only, gone_customer, case, event_name,
        given, code,
    ):  # fmt: skip
        client, cus = stripe_client, metered.customer.id
        now = emulator.now()
        fields = {k: {"CUS": cus, "GONE": gone_customer}.get(v, v) for k, v in given.items()}
        if "timestamp" in fields:
            fields["timestamp"] += now
        if event_name == "INACTIVE":
            event_name = "api_calls"
            client.v1.billing.meters.deactivate(metered.meter.id)
        ev = send(client, event_name, key="idem-bad-1", identifier="usage-bad-1", **fields)
        assert ev.object == "billing.meter_event" and ev.identifier == "usage-bad-1"
        assert ev.last_response.code == 200
        stats = emulator.stats()
        assert stats["meter_events"]["accepted"] == 0
        assert stats["meter_events"]["rejected_async"] == 1
        assert stats["meter_events"]["rejected"] == 0
        assert stats["billed"] == {}
        client.v1.billing.meters.reactivate(metered.meter.id)
        assert total(client, metered.meter, cus, emulator) == 0.0  # never aggregated

        ((headers, body),) = wait_reports(emulator, reports_only, 1)
        notification = client.parse_event_notification(
            body, headers["Stripe-Signature"], WEBHOOK_SECRET
        )
        assert isinstance(notification, V1BillingMeterErrorReportTriggeredEventNotification)
        assert notification.related_object.id == metered.meter.id
        assert notification.related_object.url == f"/v1/billing/meters/{metered.meter.id}"
        event = notification.fetch_event()
        assert isinstance(event, V1BillingMeterErrorReportTriggeredEvent)
        ((error_type,),) = [event.data.reason.error_types]
        assert (event.data.reason.error_count, error_type.code, error_type.error_count) == (
            1,
            code,
            1,
        )
        ((sample,),) = [error_type.sample_errors]
        assert sample.request.identifier == "idem-bad-1"  # the request's Idempotency-Key
        assert sample.error_message
        assert event.data.developer_message_summary == "There is 1 invalid event"
        assert emulator.stats()["meter_events"]["error_reports"] == 1

    def test_unknown_event_name_reports_no_meter_found_without_related_object(
        self, stripe_client, metered, emulator, reports_only
    ):
        ev = send(
            stripe_client, "api_callz", key="idem-typo", stripe_customer_id="cus_x", value="1"
        )
        assert ev.event_name == "api_callz"
        ((headers, body),) = wait_reports(emulator, reports_only, 1)
        thin = json.loads(body)
        assert thin["type"] == "v1.billing.meter.no_meter_found"
        assert thin["related_object"] is None
        notification = stripe_client.parse_event_notification(
            body, headers["Stripe-Signature"], WEBHOOK_SECRET
        )
        assert isinstance(notification, V1BillingMeterNoMeterFoundEventNotification)
        event = notification.fetch_event()
        assert isinstance(event, V1BillingMeterNoMeterFoundEvent)
        ((error_type,),) = [event.data.reason.error_types]
        assert error_type.code == "no_meter"
        assert [s.request.identifier for s in error_type.sample_errors] == ["idem-typo"]
        assert "api_callz" in error_type.sample_errors[0].error_message

    def test_thin_payload_is_signed_and_carries_no_data(
        self, stripe_client, metered, emulator, reports_only
    ):
        send(stripe_client, key="k1", stripe_customer_id="cus_nope", value="1")
        ((headers, body),) = wait_reports(emulator, reports_only, 1)
        thin = json.loads(body)
        assert set(thin) == THIN_KEYS  # no data, no pending_webhooks, no api_version
        assert thin["id"].startswith("evt_test_") and thin["object"] == "v2.core.event"
        assert (thin["context"], thin["reason"], thin["livemode"]) == (None, None, False)
        assert ISO_MS.match(thin["created"])
        assert thin["related_object"]["type"] == "billing.meter"
        sig = headers["Stripe-Signature"]
        assert re.match(r"^t=\d+,v1=[0-9a-f]{64}$", sig)
        stripe_client.parse_event_notification(body, sig, WEBHOOK_SECRET)
        with pytest.raises(stripe.SignatureVerificationError):
            stripe_client.parse_event_notification(body, sig, "whsec_forged")
        tampered = body.replace(thin["id"].encode(), b"evt_test_forged")
        with pytest.raises(stripe.SignatureVerificationError):
            stripe_client.parse_event_notification(tampered, sig, WEBHOOK_SECRET)

    def test_full_event_counts_every_error_and_samples_at_most_five_per_code(
        self, stripe_client, metered, emulator, reports_only
    ):
        client, cus = stripe_client, metered.customer.id
        for i in range(7):
            send(
                client,
                key=f"cus-{i}",
                identifier=f"u-cus-{i}",
                stripe_customer_id="cus_no",
                value="1",
            )
        for i in range(5):
            send(client, key=f"val-{i}", identifier=f"u-val-{i}", stripe_customer_id=cus, value="x")
        for i in range(3):  # well-formed ones in between are counted, and only they
            send(client, key=f"ok-{i}", stripe_customer_id=cus, value="10")
        ((headers, body),) = wait_reports(emulator, reports_only, 1)
        notification = client.parse_event_notification(
            body, headers["Stripe-Signature"], WEBHOOK_SECRET
        )
        event = notification.fetch_event()
        reason = event.data.reason
        assert reason.error_count == 12
        by_code = {t.code: t for t in reason.error_types}
        assert {c: t.error_count for c, t in by_code.items()} == {
            "meter_event_customer_not_found": 7,
            "meter_event_invalid_value": 5,
        }
        samples = by_code["meter_event_customer_not_found"].sample_errors
        assert [s.request.identifier for s in samples] == [f"cus-{i}" for i in range(5)]
        assert len(by_code["meter_event_invalid_value"].sample_errors) == 5
        assert event.data.developer_message_summary == "There are 12 invalid events"
        start = datetime.fromisoformat(event.data.validation_start)
        end = datetime.fromisoformat(event.data.validation_end)
        assert ISO_MS.match(event.data.validation_start) and end > start
        assert emulator.stats()["billed"] == {cus: {"api_calls": 30}}
        assert total(client, metered.meter, cus, emulator) == 30.0
        # The library's v2 events service reads the same event.
        again = client.v2.core.events.retrieve(notification.id)
        assert again.to_dict() == event.to_dict()
        assert again.related_object.id == metered.meter.id

    def test_report_waits_for_the_delay_and_each_window_reports_once(
        self, stripe_client, metered, emulator, reports_only
    ):
        emulator.post("settings", {"error_report_delay_seconds": 30})
        send(stripe_client, key="w1-a", stripe_customer_id="cus_no", value="1")
        emulator.advance(20)
        send(stripe_client, key="w1-b", stripe_customer_id="cus_no", value="1")
        emulator.flush_webhooks()
        assert thin_deliveries(reports_only) == []
        emulator.advance(11)
        emulator.flush_webhooks()
        assert len(thin_deliveries(reports_only)) == 1
        send(stripe_client, key="w2-a", stripe_customer_id="cus_no", value="1")  # a new window
        emulator.advance(31)
        emulator.flush_webhooks()
        reports = [
            stripe_client.v2.core.events.retrieve(json.loads(b)["id"])
            for _, b in thin_deliveries(reports_only)
        ]
        assert [r.data.reason.error_count for r in reports] == [2, 1]
        first_window = reports[0].data
        seconds = (
            datetime.fromisoformat(first_window.validation_end)
            - datetime.fromisoformat(first_window.validation_start)
        ).total_seconds()
        assert seconds == 30
        samples = [
            s.request.identifier
            for r in reports
            for s in r.data.reason.error_types[0].sample_errors
        ]
        assert samples == ["w1-a", "w1-b", "w2-a"]

    def test_one_report_per_meter(self, stripe_client, metered, emulator, reports_only):
        other = stripe_client.v1.billing.meters.create(
            {"display_name": "B", "event_name": "other", "default_aggregation": {"formula": "sum"}}
        )
        send(stripe_client, key="a", stripe_customer_id="cus_no", value="1")
        send(stripe_client, "other", key="b", stripe_customer_id="cus_no", value="1")
        reports = wait_reports(emulator, reports_only, 2)
        related = sorted(json.loads(b)["related_object"]["id"] for _, b in reports)
        assert related == sorted([metered.meter.id, other.id])

    def test_sample_identifier_can_be_the_meter_event_identifier(
        self, stripe_client, metered, emulator, reports_only
    ):
        emulator.post("settings", {"error_report_identifier": "identifier"})
        send(
            stripe_client,
            key="idem-1",
            identifier="billing-usage-7",
            stripe_customer_id="cus_no",
            value="1",
        )
        ((_, body),) = wait_reports(emulator, reports_only, 1)
        event = stripe_client.v2.core.events.retrieve(json.loads(body)["id"])
        sample = event.data.reason.error_types[0].sample_errors[0]
        assert sample.request.identifier == "billing-usage-7"

    def test_resent_rejected_identifier_is_a_duplicate(self, stripe_client, metered, emulator):
        send(stripe_client, identifier="u-1", stripe_customer_id="cus_no", value="4")
        with pytest.raises(stripe.InvalidRequestError, match="already exists") as refused:
            send(stripe_client, identifier="u-1", stripe_customer_id=metered.customer.id, value="4")
        assert refused.value.headers["Stripe-Should-Retry"] == "false"
        # A cancel of the rejected event changes nothing billed.
        stripe_client.v1.billing.meter_event_adjustments.create(
            {"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "u-1"}}
        )
        stats = emulator.stats()["meter_events"]
        assert (stats["duplicates"], stats["rejected_async"], stats["accepted"]) == (1, 1, 0)
        assert emulator.stats()["billed"] == {}

    def test_schema_errors_stay_synchronous(self, stripe_client, metered, emulator):
        with pytest.raises(stripe.InvalidRequestError, match="unknown parameter"):
            stripe_client.v1.billing.meter_events.create(
                {"event_name": "api_calls", "payload": {"value": "1"}, "extra": "x"}
            )
        assert emulator.stats()["meter_events"]["rejected_async"] == 0

    def test_reset_drops_pending_reports_and_thin_events(
        self, stripe_client, metered, emulator, reports_only
    ):
        send(stripe_client, key="r1", stripe_customer_id="cus_no", value="1")
        ((_, body),) = wait_reports(emulator, reports_only, 1)
        send(stripe_client, key="r2", stripe_customer_id="cus_no", value="1")
        emulator.post("reset")
        emulator.post("webhooks", {"url": reports_only.url, "secret": WEBHOOK_SECRET})
        emulator.advance(DELAY + 1)
        emulator.flush_webhooks()
        assert len(thin_deliveries(reports_only)) == 1  # the second report never comes
        with pytest.raises(stripe.InvalidRequestError) as missing:
            stripe_client.v2.core.events.retrieve(json.loads(body)["id"])
        assert missing.value.http_status == 404
        assert emulator.stats()["thin_events"] == 0


def test_unknown_v2_event_is_404(stripe_client):
    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_client.v2.core.events.retrieve("evt_test_nothing")
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"


def test_thin_events_go_to_their_own_destination(
    stripe_client, metered, emulator, webhook_receiver
):
    thin_receiver = Receiver()
    try:
        emulator.post("webhooks", {"thin_url": thin_receiver.url, "thin_secret": "whsec_thin"})
        send(stripe_client, key="d1", stripe_customer_id="cus_no", value="1")
        stripe_client.v1.customers.create({"email": "snapshot@example.com"})
        emulator.advance(DELAY + 1)
        emulator.flush_webhooks()
        assert thin_deliveries(webhook_receiver) == []
        ((headers, body),) = thin_deliveries(thin_receiver)
        stripe_client.parse_event_notification(body, headers["Stripe-Signature"], "whsec_thin")
        snapshots = [json.loads(b)["type"] for _, b in webhook_receiver.received]
        assert "customer.created" in snapshots  # snapshot events still go to `url`
        assert emulator.get("webhooks")["config"]["thin_secret"] == "whsec_thin…"
    finally:
        thin_receiver.close()


class TestSync:
    def test_sync_answers_400_and_reports_nothing(
        self, stripe_client, metered, sync_meter_validation, reports_only
    ):
        with pytest.raises(stripe.InvalidRequestError, match="No such customer"):
            send(stripe_client, stripe_customer_id="cus_no", value="1")
        sync_meter_validation.advance(DELAY + 1)
        sync_meter_validation.flush_webhooks()
        assert thin_deliveries(reports_only) == []
        stats = sync_meter_validation.stats()["meter_events"]
        assert (stats["rejected"], stats["rejected_async"], stats["error_reports"]) == (1, 0, 0)

    def test_sync_rejected_identifier_may_be_sent_again(
        self, stripe_client, metered, sync_meter_validation
    ):
        with pytest.raises(stripe.InvalidRequestError):
            send(stripe_client, identifier="s-1", stripe_customer_id="cus_no", value="2")
        send(stripe_client, identifier="s-1", stripe_customer_id=metered.customer.id, value="2")
        assert sync_meter_validation.stats()["billed"] == {metered.customer.id: {"api_calls": 2}}


class TestSummaryLag:
    def test_summaries_catch_up_after_the_lag(self, stripe_client, metered, emulator):
        emulator.post("settings", {"summary_lag_seconds": 30})
        cus = metered.customer.id
        send(stripe_client, stripe_customer_id=cus, value="5")
        assert total(stripe_client, metered.meter, cus, emulator) == 0.0
        assert emulator.stats()["billed"] == {cus: {"api_calls": 5}}  # received all the same
        emulator.advance(31)
        assert total(stripe_client, metered.meter, cus, emulator) == 5.0

    def test_draft_invoice_lines_lag_too(self, stripe_client, metered, emulator):
        client, cus = stripe_client, metered.customer.id
        item = metered.subscription["items"].data[0]
        end = item.current_period_end
        emulator.advance(end - emulator.now() + 10)  # the renewal draft exists now
        emulator.post("settings", {"summary_lag_seconds": 30})
        (draft,) = client.v1.invoices.list({"customer": cus, "status": "draft"}).data
        send(client, stripe_customer_id=cus, value="300", timestamp=end - 60)  # late usage
        assert client.v1.invoices.retrieve(draft.id).lines.data[0].quantity == 0
        emulator.advance(31)
        refreshed = client.v1.invoices.retrieve(draft.id)
        assert refreshed.lines.data[0].quantity == 300 and refreshed.amount_due == 150


class TestSettings:
    def test_settings_control_validates(self, emulator):
        current = emulator.get("settings")
        assert {k: current[k] for k in (
            "meter_validation", "error_report_delay_seconds", "error_report_samples",
            "error_report_identifier", "summary_lag_seconds",
        )} == {
            "meter_validation": "async", "error_report_delay_seconds": 5,
            "error_report_samples": 5, "error_report_identifier": "idempotency_key",
            "summary_lag_seconds": 0,
        }  # fmt: skip
        for bad in (
            {"meter_validation": "later"},
            {"error_report_samples": 0},
            {"summary_lag_seconds": -1},
            {"error_report_delay_seconds": "5"},
            {"error_report_identifier": "uuid"},
            {"nope": 1},
        ):
            with pytest.raises(urllib.error.HTTPError) as refused:
                emulator.post("settings", bad)
            assert refused.value.code == 400
        assert emulator.get("settings") == current  # all or nothing

    def test_python_api_settings_survive_reset(self):
        with EmulatorServer(
            port=0,
            rate_limits="off",
            meter_validation="sync",
            error_report_delay_seconds=1,
            error_report_samples=2,
            error_report_identifier="identifier",
            summary_lag_seconds=7,
        ) as server:
            controls = Controls(server.url)
            controls.post("settings", {"meter_validation": "async", "summary_lag_seconds": 0})
            controls.post("reset")
            got = controls.get("settings")
            assert {k: got[k] for k in ("meter_validation", "error_report_identifier")} == {
                "meter_validation": "sync",
                "error_report_identifier": "identifier",
            }
            delays = ("error_report_delay_seconds", "error_report_samples", "summary_lag_seconds")
            assert [got[k] for k in delays] == [1, 2, 7]
