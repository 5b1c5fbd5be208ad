"""The v2 meter event stream through stripe-python over HTTP: a session (secret key) gives a token,
the stream takes 1..100 events with it and records them through v1's asynchronous path (shared
identifier dedupe, error reports, summaries, billed totals); an expired token is a 401 that the
library raises as TemporarySessionExpiredError."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import pytest
import stripe

from billing.emulator import EmulatorServer
from billing.emulator.cli import build_parser
from billing.emulator.limits import PRESETS
from tests.emulator.test_metering import REPORT_TYPES, send, total, wait_reports


def rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def session(client: stripe.StripeClient) -> Any:
    return client.v2.billing.meter_event_session.create()


def stream(client: stripe.StripeClient, token: str, events: list[dict[str, Any]]) -> Any:
    return client.v2.billing.meter_event_stream.create({"events": events}, {"api_key": token})


def event(cus: str, value: int, identifier: str, ts: int, name: str = "api_calls") -> dict:
    payload = {"stripe_customer_id": cus, "value": str(value)}
    return {
        "event_name": name,
        "payload": payload,
        "identifier": identifier,
        "timestamp": rfc3339(ts),
    }


def raw_stream(url: str, token: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url + "/v2/billing/meter_event_stream", data=body, method="POST")
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def meter_client(stripe_emulator: EmulatorServer) -> stripe.StripeClient:
    """The product's shape: the stream on the meter_events base address only."""
    url = stripe_emulator.url
    return stripe.StripeClient(
        "sk_test_emulator", base_addresses={"api": url, "meter_events": url}, max_network_retries=0
    )


@pytest.fixture
def reports(emulator, webhook_receiver):
    emulator.post("webhooks", {"enabled_events": REPORT_TYPES})
    return webhook_receiver


class TestSession:
    def test_token_and_rfc3339_expiry_of_the_configured_lifetime(self, meter_client, emulator):
        now = emulator.now()
        sess = session(meter_client)
        assert sess.object == "v2.billing.meter_event_session"
        assert sess.authentication_token
        created = datetime.fromisoformat(sess.created).timestamp()
        expires = datetime.fromisoformat(sess.expires_at).timestamp()
        assert expires - created == 900 and abs(created - now) <= 1
        emulator.post("settings", {"meter_event_session_seconds": 3})
        short = session(meter_client)
        gap = datetime.fromisoformat(short.expires_at) - datetime.fromisoformat(short.created)
        assert gap.total_seconds() == 3

    def test_needs_a_secret_key(self, stripe_emulator):
        client = stripe.StripeClient(
            "not_a_key", base_addresses={"api": stripe_emulator.url}, max_network_retries=0
        )
        with pytest.raises(stripe.AuthenticationError):
            session(client)

    def test_cli_flag(self):
        assert build_parser().parse_args([]).meter_event_session_seconds == 900
        parsed = build_parser().parse_args(["--meter-event-session-seconds", "3"])
        assert parsed.meter_event_session_seconds == 3
        assert PRESETS["live"]["paths"]["/v2/billing/meter_event_stream"] == 10000.0


class TestStream:
    def test_events_billed_and_summarised_like_v1(self, meter_client, metered, emulator):
        cus, now = metered.customer.id, emulator.now()
        token = session(meter_client).authentication_token
        events = [event(cus, i, f"s-{i}", now - 60) for i in range(1, 101)]
        assert stream(meter_client, token, events) is None  # `{}`: stripe-python returns None
        stats = emulator.stats()
        assert stats["billed"] == {cus: {"api_calls": 5050}}
        assert stats["meter_events"]["accepted"] == 100
        assert stats["meter_event_stream"]["requests"] == 1
        assert stats["meter_event_stream"]["events"] == 100
        assert total(meter_client, metered.meter, cus, emulator) == 5050.0

    def test_identifiers_shared_with_v1_and_resends_harmless(self, meter_client, metered, emulator):
        cus, now = metered.customer.id, emulator.now()
        send(meter_client, identifier="shared-1", stripe_customer_id=cus, value="7")
        token = session(meter_client).authentication_token
        batch = [event(cus, 7, "shared-1", now), event(cus, 3, "s-2", now)]
        stream(meter_client, token, batch)
        stream(meter_client, token, batch)  # a whole request re-sent
        with pytest.raises(stripe.InvalidRequestError):  # and v1 sees the stream's identifier
            send(meter_client, identifier="s-2", stripe_customer_id=cus, value="3")
        stats = emulator.stats()
        assert stats["billed"] == {cus: {"api_calls": 10}}
        assert stats["meter_events"]["duplicates"] == 4

    def test_failed_event_is_reported_asynchronously(
        self, meter_client, metered, emulator, reports
    ):
        cus, now = metered.customer.id, emulator.now()
        token = session(meter_client).authentication_token
        stream(meter_client, token, [event(cus, 1, "ok-1", now), event("cus_gone", 1, "bad", now)])
        stats = emulator.stats()
        assert stats["billed"] == {cus: {"api_calls": 1}}
        assert stats["meter_events"]["rejected_async"] == 1
        ((_, body),) = wait_reports(emulator, reports, 1)
        assert json.loads(body)["type"] == "v1.billing.meter.error_report_triggered"

    @pytest.mark.parametrize(
        ("case", "events"),
        [
            ("none", []),
            ("101", [{"event_name": "api_calls", "payload": {}}] * 101),
            ("no payload", [{"event_name": "api_calls"}]),
            ("number value", [{"event_name": "api_calls", "payload": {"value": 1}}]),
            ("int timestamp", [{"event_name": "api_calls", "payload": {}, "timestamp": 1}]),
            ("unknown field", [{"event_name": "api_calls", "payload": {}, "x": 1}]),
        ],
    )
    def test_malformed_request_is_a_v2_400_and_nothing_taken(
        self, meter_client, metered, emulator, stripe_emulator, case, events
    ):
        token = session(meter_client).authentication_token
        good = event(metered.customer.id, 1, "good", emulator.now())
        body = {"events": [good, *events]} if events and case != "101" else {"events": events}
        status, answer = raw_stream(stripe_emulator.url, token, json.dumps(body).encode())
        assert status == 400
        assert set(answer["error"]) >= {"type", "code", "message"}
        assert emulator.stats()["billed"] == {}
        with pytest.raises(stripe.InvalidRequestError):
            stream(meter_client, token, events or [])

    def test_takes_the_session_token_only(self, meter_client, stripe_emulator):
        with pytest.raises(stripe.AuthenticationError):
            stream(meter_client, "sk_test_emulator", [])
        status, answer = raw_stream(stripe_emulator.url, "mes_test_unknown", b"{}")
        assert status == 401 and answer["error"]["type"] == "invalid_request_error"

    def test_expired_token_is_temporary_session_expired(self, meter_client, metered, emulator):
        cus = metered.customer.id
        token = session(meter_client).authentication_token
        emulator.advance(901)
        with pytest.raises(stripe.TemporarySessionExpiredError) as caught:
            stream(meter_client, token, [event(cus, 1, "late", emulator.now())])
        assert caught.value.http_status == 401
        assert caught.value.code == "billing_meter_event_session_expired"
        fresh = session(meter_client).authentication_token
        stream(meter_client, fresh, [event(cus, 1, "late", emulator.now())])
        stats = emulator.stats()
        assert stats["billed"] == {cus: {"api_calls": 1}}
        assert stats["meter_event_stream"]["expired"] == 1

    def test_live_preset_gives_the_stream_its_own_bucket(self, emulator, meter_client):
        emulator.post("limits", {"preset": "live"})
        limits = emulator.get("limits")
        assert limits["paths"]["/v2/billing/meter_event_stream"] == 10000.0
