"""A local, stateful, Stripe-speaking HTTP server for tests, benchmarks and demos.

Point any stripe-python code at it::

    from billing.emulator import EmulatorServer
    import stripe

    with EmulatorServer(port=0, rate_limits="off") as server:
        client = stripe.StripeClient(
            "sk_test_anything", base_addresses={"api": server.url, "meter_events": server.url}
        )
        client.v1.customers.create({"email": "a@example.com"})

or run it: ``python -m billing.emulator --port 12111 --webhook-url URL --webhook-secret whsec_...``.

API: customers, products, prices (metered with a meter), billing meters (+ deactivate/reactivate,
event summaries), meter events (+ adjustments; validated asynchronously by default, failures
reported by thin events), subscriptions (period on items, API 2026-10-28), subscription items,
invoices (+ one-off drafts, delete, lines, finalize, pay, void), invoice items, checkout sessions
(mode subscription), entitlement features, product features, active entitlements, events (v1
snapshot; v2 thin at ``GET /v2/core/events/{id}``).
Auth ``Bearer sk_test_...`` (live keys refused), unknown parameters refused, ``Idempotency-Key``
replayed for 24 h, Stripe's error bodies and status codes.

Test controls (JSON; no API key; loopback peers only unless ``--allow-remote-controls``):

- ``GET  /_emulator/health`` → ``{"ok": true, "api_version": ...}``
- ``POST /_emulator/reset`` → every object, event, stat, fault, limit, setting and webhook
  setting back to how the server was started; clock offset 0.
- ``GET|POST /_emulator/clock`` ``{"advance": seconds}`` or ``{"set": unix_ts}`` → runs the work
  falling due on the way, in time order (period roll-over + draft invoice + ``invoice.created``;
  finalization after ``finalize_delay``; identifier/idempotency expiry)
  → ``{"now", "offset", "iso"}``.
- ``GET|POST /_emulator/faults`` ``{"path": "/v1/billing/meter_events", "method": "POST",
  "status": 429|500|503|..., "code": "lock_timeout", "should_retry": bool, "latency_ms": 200,
  "drop": true, "count": N, "probability": 0.3, "seed": 7}`` (one rule), ``{"faults": [...]}``
  (several) or ``{"clear": true}``. ``path`` is exact, a prefix, or ``*``.
- ``GET|POST /_emulator/limits`` ``{"preset": "test"|"live"|"off", "global": rps|null,
  "paths": {"/v1/billing/meter_events": rps|null}}``.
- ``GET|POST /_emulator/settings`` ``{"finalize_delay": seconds, "invoice_auto_pay": bool,
  "meter_validation": "async"|"sync", "error_report_delay_seconds": s, "error_report_samples": n,
  "error_report_identifier": "idempotency_key"|"identifier", "summary_lag_seconds": s}``.
- ``GET /_emulator/stats`` → ``{"requests": {"METHOD path": n}, "responses": {"METHOD path":
  {"status": n}}, "billed": {customer: {event_name: sum}}, "meter_events": {"accepted",
  "duplicates", "rejected", "rejected_async", "error_reports", "canceled", "lock_timeouts"},
  "webhooks": {...}, "events": n, "thin_events": n, "now"}``;
  ``POST /_emulator/stats/reset`` clears the request counters.
- ``GET|POST /_emulator/webhooks`` ``{"url", "secret", "duplicate": bool, "order": "in_order"|
  "reverse"|"shuffle", "hold_ms", "backoff_ms", "max_backoff_ms", "max_attempts", "timeout_s",
  "timestamp_offset", "enabled_events": [...], "seed", "thin_url", "thin_secret",
  "clear_deliveries": bool}`` →
  ``{"config", "pending", "deliveries": [{"event_id", "type", "attempt", "status", "error", "ok",
  "duplicate", "at"}]}``; ``POST /_emulator/webhooks/flush`` ``{"timeout": s}`` waits until
  every queued delivery is done.
- ``POST /_emulator/checkout_sessions/{id}/complete`` ``{"email"?, "name"?}`` completes a session
  as if paid (customer if needed, subscription, ``checkout.session.completed``, entitlements).
  ``GET /_emulator/checkout/{id}`` is a tiny payment page (the session's ``url``).

Details, defaults and examples: ``billing/emulator/README.md``.
"""

from __future__ import annotations

from billing.emulator.app import Emulator, Options
from billing.emulator.server import EmulatorServer
from billing.emulator.webhooks import sign

__all__ = ["Emulator", "EmulatorServer", "Options", "sign"]
