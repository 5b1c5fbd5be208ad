"""Ingest over HTTP: what is refused stores nothing; what is accepted is stored once and queued."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from billing import logs
from billing.webhooks.publish import background_publisher
from tests.fixtures.webhooks import (
    OLD_SECRET,
    AppServer,
    host_app,
    make_event,
    post,
    rows,
    sign,
    standalone_app,
)

BAD_DELIVERIES = {
    "missing signature": lambda body: (body, None),
    "forged signature": lambda body: (body, f"t={int(time.time())},v1={'ab' * 32}"),
    "garbled header": lambda body: (body, "nonsense"),
    "tampered body": lambda body: (body.replace(b"obj_1", b"obj_2"), sign(body)),
    "wrong secret": lambda body: (body, sign(body, "whsec_someone_else")),
    "stale timestamp": lambda body: (body, sign(body, timestamp=int(time.time()) - 301)),
    # Well past the tolerance: +301 s raced the clock (int() drops up to 1 s, the request takes
    # time) and passed as 299.x s now and then.
    "future timestamp": lambda body: (body, sign(body, timestamp=int(time.time()) + 330)),
    "malformed JSON": lambda body: (b'{"id": "evt_1", ', sign(b'{"id": "evt_1", ')),
    "JSON that is not an event": lambda body: (b'{"id": "cus_1"}', sign(b'{"id": "cus_1"}')),
    "event without a type": lambda body: (
        b'{"id": "evt_1", "object": "event"}',
        sign(b'{"id": "evt_1", "object": "event"}'),
    ),
    "not UTF-8": lambda body: (b"\xff\xfe", f"t={int(time.time())},v1=00"),
    # Signed, so they pass verification; the database could not store them (500 each time, and
    # Stripe would redeliver for days): refused as not an event we can keep.
    "event id too long": lambda body: _signed(make_event(event_id="evt_" + "x" * 300)),
    "event type too long": lambda body: _signed(make_event("a." * 200)),
    "NUL in the event id": lambda body: _signed(make_event(event_id="evt_a\u0000b")),
    "control character in the type": lambda body: _signed(make_event("invoice.\u0007created")),
}


def _signed(body: bytes) -> tuple[bytes, str]:
    return body, sign(body)


@pytest.mark.parametrize("case", sorted(BAD_DELIVERIES))
def test_bad_delivery_is_refused_with_400_and_nothing_stored(app_server, captured, case):
    body, signature = BAD_DELIVERIES[case](make_event())
    response = post(app_server.url, body, signature)
    assert response.status_code == 400
    assert rows(app_server.runtime) == []
    (rejected,) = captured.messages(logs.WEBHOOK_REJECTED)
    assert rejected.status == 400 and rejected.reason
    # The log line never carries the (attacker-controlled) body.
    assert "obj_1" not in json.dumps(rejected.__dict__, default=str)


def test_oversized_body_is_refused_with_413_declared_or_chunked(app_server, webhook_runtime):
    limit = webhook_runtime.settings.webhook_max_body_bytes
    body = make_event(padding="x" * limit)
    assert post(app_server.url, body).status_code == 413
    chunked = post(app_server.url, iter([body[:1000], body[1000:]]), sign(body))
    assert chunked.status_code == 413
    assert rows(webhook_runtime) == []


def test_accepted_event_is_stored_once_and_a_duplicate_is_only_acknowledged(
    app_server, webhook_runtime, captured
):
    body = make_event("customer.created", "evt_once")
    first, second = post(app_server.url, body), post(app_server.url, body)
    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.json()["outcome"], second.json()["outcome"]) == ("accepted", "duplicate")
    assert background_publisher(webhook_runtime).flush()
    (row,) = rows(webhook_runtime)
    assert (row.stripe_event_id, row.type, row.status) == (
        "evt_once",
        "customer.created",
        "received",
    )
    assert row.payload == json.loads(body)
    for message in (logs.WEBHOOK_ACCEPTED, logs.WEBHOOK_DUPLICATE):
        (record,) = captured.messages(message)
        assert (record.event_id, record.event_type) == ("evt_once", "customer.created")


def test_the_stored_payload_is_the_delivered_text(app_server, webhook_runtime):
    """What Stripe signed is what is kept, byte for byte (no second serialization)."""
    body = json.dumps(json.loads(make_event(event_id="evt_verbatim")), indent=1).encode()
    assert post(app_server.url, body).status_code == 200
    with webhook_runtime.engine.connect() as connection:
        stored = connection.exec_driver_sql(
            "SELECT payload::text FROM webhook_events WHERE stripe_event_id = 'evt_verbatim'"
        ).scalar_one()
    assert stored == body.decode()


def test_a_connection_the_database_dropped_costs_no_delivery(app_server, webhook_runtime):
    """The ingest pool has no pre-ping: a dead pooled connection fails the insert, which is
    retried once on a new connection within the same request."""
    assert post(app_server.url, make_event(event_id="evt_before")).status_code == 200
    pooled = webhook_runtime.ingest_engine.raw_connection()  # the one connection in the pool
    with pooled.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    pooled.close()
    with webhook_runtime.engine.connect() as connection:
        terminate = sa.text("SELECT pg_terminate_backend(:pid)")
        assert connection.execute(terminate, {"pid": pid}).scalar()
    response = post(app_server.url, make_event(event_id="evt_after"))
    assert (response.status_code, response.json()["outcome"]) == (200, "accepted")
    assert [row.stripe_event_id for row in rows(webhook_runtime)] == ["evt_before", "evt_after"]


def test_a_delivery_the_database_cannot_store_gets_500_so_stripe_delivers_it_again(
    webhook_settings, captured
):
    from billing.runtime import Runtime

    database_url = "postgresql://postgres@127.0.0.1:5432/billing_no_such_database"
    server = AppServer(Runtime(webhook_settings.replace(database_url=database_url)))
    try:
        response = post(server.url, make_event("invoice.created", "evt_unstored"))
    finally:
        server.close()
        server.runtime.close()
    assert (response.status_code, response.json()) == (500, {"error": 500})
    (unstored,) = captured.messages(logs.WEBHOOK_SERVER_ERROR)
    assert (unstored.event_id, unstored.event_type, unstored.error) == (
        "evt_unstored",
        "invoice.created",
        "OperationalError",
    )
    assert unstored.exc_info is not None
    assert captured.messages(logs.WEBHOOK_ACCEPTED) == []


def test_an_old_secret_still_verifies_during_rotation(app_server, webhook_runtime):
    body = make_event(event_id="evt_rotated")
    assert post(app_server.url, body, sign(body, OLD_SECRET)).status_code == 200
    assert [row.stripe_event_id for row in rows(webhook_runtime)] == ["evt_rotated"]


def test_thin_v2_event_is_accepted(app_server, webhook_runtime):
    body = json.dumps(
        {
            "id": "evt_thin",
            "object": "v2.core.event",
            "type": "v1.billing.meter.error_report_triggered",
            "related_object": {"id": "mtr_1", "type": "billing.meter"},
        }
    ).encode()
    assert post(app_server.url, body).status_code == 200
    assert rows(webhook_runtime)[0].type == "v1.billing.meter.error_report_triggered"


def test_broker_down_still_answers_200_and_keeps_the_row(make_runtime, webhook_settings, captured):
    # Nothing listens on port 1: every publish fails at once.
    runtime = make_runtime(webhook_settings.replace(celery_broker_url="redis://127.0.0.1:1/0"))
    server = AppServer(runtime)
    try:
        started = time.perf_counter()
        response = post(server.url, make_event(event_id="evt_nobroker"))
        elapsed = time.perf_counter() - started
        assert background_publisher(runtime).flush()
    finally:
        server.close()
    # The answer does not wait for the broker; the failed publish is logged when it fails.
    assert response.status_code == 200 and response.json()["outcome"] == "accepted"
    assert elapsed < 1
    assert [(r.stripe_event_id, r.status) for r in rows(runtime)] == [("evt_nobroker", "received")]
    (failed,) = captured.messages(logs.WEBHOOK_ENQUEUE_FAILED)
    assert (failed.event_id, failed.event_type) == ("evt_nobroker", "test.event")
    assert captured.messages(logs.WEBHOOK_ACCEPTED) == []


def test_a_full_publisher_backlog_leaves_the_event_to_the_sweep(
    app_server, webhook_runtime, captured, monkeypatch
):
    monkeypatch.setattr(background_publisher(webhook_runtime), "max_pending", 0)
    response = post(app_server.url, make_event(event_id="evt_backlog"))
    assert response.status_code == 200 and response.json()["outcome"] == "stored_not_queued"
    assert [(r.stripe_event_id, r.status) for r in rows(webhook_runtime)] == [
        ("evt_backlog", "received")
    ]
    (failed,) = captured.messages(logs.WEBHOOK_ENQUEUE_FAILED)
    assert (failed.event_id, failed.error) == ("evt_backlog", "publisher backlog")


def test_missing_secret_is_a_server_error_not_an_acceptance(make_runtime, webhook_settings):
    server = AppServer(make_runtime(webhook_settings.replace(stripe_webhook_secret=None)))
    try:
        response = post(server.url, make_event())
    finally:
        server.close()
    assert response.status_code == 500
    assert rows(server.runtime) == []


def test_webhook_path_is_configurable(make_runtime, webhook_settings):
    server = AppServer(make_runtime(webhook_settings.replace(webhook_path="/hooks/stripe")))
    try:
        assert server.url.endswith("/hooks/stripe")
        assert post(server.url, make_event(event_id="evt_path")).status_code == 200
    finally:
        server.close()


def test_a_host_app_gets_the_endpoint_from_billing(webhook_runtime):
    body = make_event(event_id="evt_host")
    response = (
        host_app(webhook_runtime)
        .test_client()
        .post("/stripe/webhook", data=body, headers={"Stripe-Signature": sign(body)})
    )
    assert response.status_code == 200
    assert [row.stripe_event_id for row in rows(webhook_runtime)] == ["evt_host"]


@pytest.mark.parametrize(
    "csrf_first", [True, False], ids=["csrf-then-billing", "billing-then-csrf"]
)
def test_a_host_apps_csrf_protection_does_not_refuse_stripe(webhook_runtime, csrf_first):
    """Stripe cannot send a CSRF token: an app-wide CSRFProtect must not turn deliveries away,
    whichever extension the host sets up first, while its other POST routes stay protected."""
    from flask import Flask
    from flask_wtf.csrf import CSRFProtect

    from billing.app import EXTENSION_KEY, Billing

    host = Flask("host")
    host.config["SECRET_KEY"] = "host-secret"
    host.add_url_rule("/form", "form", lambda: "posted", methods=["POST"])
    if csrf_first:
        CSRFProtect(host)
    Billing(host, webhook_runtime.settings)
    if not csrf_first:
        CSRFProtect(host)
    host.extensions[EXTENSION_KEY]._runtime = webhook_runtime
    client = host.test_client()
    body = make_event(event_id="evt_csrf_host")
    response = client.post("/stripe/webhook", data=body, headers={"Stripe-Signature": sign(body)})
    assert response.status_code == 200
    assert [row.stripe_event_id for row in rows(webhook_runtime)] == ["evt_csrf_host"]
    assert client.post("/form").status_code == 400  # the host's own forms keep their CSRF check


def test_the_standalone_route_and_a_host_apps_view_answer_alike(webhook_runtime):
    """create_app() answers Stripe's POSTs ahead of Flask's dispatch (endpoint.DirectRoute); a
    host app's Flask view must give the same answers, and other methods stay Flask's (405)."""
    limit = webhook_runtime.settings.webhook_max_body_bytes
    forged = make_event(event_id="evt_forged")
    oversized = make_event(padding="x" * limit)
    answers = {}
    for name, make_app in (("standalone", standalone_app), ("host", host_app)):
        client = make_app(webhook_runtime).test_client()
        accepted = make_event(event_id=f"evt_{name}")

        def send(body, signature, client=client):
            headers = {"Stripe-Signature": signature} if signature else {}
            response = client.post("/stripe/webhook", data=body, headers=headers)
            return response.status_code, response.content_type, response.get_json()

        answers[name] = [
            send(forged, f"t={int(time.time())},v1={'ab' * 32}"),
            send(forged, None),
            send(oversized, sign(oversized)),
            send(accepted, sign(accepted)),
            send(accepted, sign(accepted)),
            client.get("/stripe/webhook").status_code,
        ]
    assert (
        answers["standalone"]
        == answers["host"]
        == [
            (400, "application/json", {"error": 400}),
            (400, "application/json", {"error": 400}),
            (413, "application/json", {"error": 413}),
            (200, "application/json", {"received": True, "outcome": "accepted"}),
            (200, "application/json", {"received": True, "outcome": "duplicate"}),
            405,
        ]
    )
    assert sorted(row.stripe_event_id for row in rows(webhook_runtime)) == [
        "evt_host",
        "evt_standalone",
    ]
