"""Webhook metrics: received, duplicate, rejected by reason, processed and failed by type, and
the dead-letter gauge, as Prometheus scrapes them from the web app's /metrics."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from billing.webhooks import service
from tests.fixtures.webhooks import make_event, post, sign
from tests.test_metrics import scrape


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_ingest_counts_received_duplicates_and_rejections_by_reason(app_server):
    before = {
        "received": value("billing_webhooks_received_total"),
        "duplicate": value("billing_webhooks_duplicate_total"),
        "signature": value("billing_webhooks_rejected_total", reason="signature"),
        "timestamp": value("billing_webhooks_rejected_total", reason="timestamp"),
        "payload": value("billing_webhooks_rejected_total", reason="payload"),
        "too_large": value("billing_webhooks_rejected_total", reason="too_large"),
    }
    body = make_event("test.metrics", "evt_metrics_1")
    assert post(app_server.url, body).status_code == 200
    assert post(app_server.url, body).status_code == 200
    assert post(app_server.url, body, f"t={int(time.time())},v1=forged").status_code == 400
    assert post(app_server.url, body, None).status_code == 400
    stale = sign(body, timestamp=int(time.time()) - 3600)
    assert post(app_server.url, body, stale).status_code == 400
    assert post(app_server.url, b"[1]", sign(b"[1]")).status_code == 400
    huge = b"x" * (app_server.runtime.settings.webhook_max_body_bytes + 1)
    assert post(app_server.url, huge, sign(huge)).status_code == 413

    assert value("billing_webhooks_received_total") == before["received"] + 2
    assert value("billing_webhooks_duplicate_total") == before["duplicate"] + 1
    after = {
        reason: value("billing_webhooks_rejected_total", reason=reason)
        for reason in ("signature", "timestamp", "payload", "too_large")
    }
    assert after == {
        "signature": before["signature"] + 2,
        "timestamp": before["timestamp"] + 1,
        "payload": before["payload"] + 1,
        "too_large": before["too_large"] + 1,
    }


def test_processing_counts_by_type_and_dead_letters_show_at_scrape(app_server, webhook_runtime):
    for event_id in ("evt_metrics_ok", "evt_metrics_bad"):
        assert post(app_server.url, make_event("test.metrics", event_id)).status_code == 200
    processed = value("billing_webhooks_processed_total", type="test.metrics")
    failed = value("billing_webhooks_failed_total", type="test.metrics")

    def broken(runtime, event):
        raise ValueError("a bug in the handler")

    ok = service.process_event(
        webhook_runtime,
        "evt_metrics_ok",
        {"test.metrics": lambda runtime, event: None},
        final_attempt=True,
        transient_errors=(),
    )
    bad = service.process_event(
        webhook_runtime,
        "evt_metrics_bad",
        {"test.metrics": broken},
        final_attempt=True,
        transient_errors=(),
    )
    assert (ok, bad) == (service.ProcessOutcome.PROCESSED, service.ProcessOutcome.FAILED)
    assert value("billing_webhooks_processed_total", type="test.metrics") == processed + 1
    assert value("billing_webhooks_failed_total", type="test.metrics") == failed + 1
    scraped = scrape(webhook_runtime.settings)
    assert scraped[("billing_webhook_dead_letters", ())] == 1
    assert scraped[("billing_webhooks_failed_total", (("type", "test.metrics"),))] == failed + 1
