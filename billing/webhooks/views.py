"""The webhook endpoint: verify, store once, queue, answer. Nothing slow happens here."""

from __future__ import annotations

from flask import Blueprint, Response, request

from billing import logs, metrics
from billing.runtime import current_runtime
from billing.webhooks import service
from billing.webhooks.tasks import hand_off

log = logs.get_logger("billing.webhooks")

SIGNATURE_HEADER = "Stripe-Signature"


def make_blueprint(path: str) -> Blueprint:
    blueprint = Blueprint("billing_webhooks", __name__)
    blueprint.add_url_rule(path, "receive", receive_webhook, methods=["POST"])
    return blueprint


def receive_webhook() -> Response:
    runtime = current_runtime()
    settings = runtime.settings
    body = _read_body(settings.webhook_max_body_bytes)
    if body is None:
        return _reject(
            service.WebhookRejected("body over the size limit", status=413, kind="too_large")
        )
    try:
        delivery = service.verify_delivery(
            body, request.headers.get(SIGNATURE_HEADER), settings
        )
    except service.WebhookRejected as rejected:
        return _reject(rejected)
    outcome = service.ingest(runtime, delivery, hand_off(runtime))
    return Response(f'{{"received": true, "outcome": "{outcome.value}"}}', 200,
                    mimetype="application/json")


def _read_body(limit: int) -> bytes | None:
    """The raw body (the signature covers its exact bytes), or None past `limit`; a declared
    length is refused before reading, a chunked body after `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = request.stream.read(limit + 1)
    return None if len(body) > limit else body


def _reject(rejected: service.WebhookRejected) -> Response:
    metrics.WEBHOOKS_REJECTED.labels(reason=rejected.kind).inc()
    # Never the body: it is attacker-controlled and may carry customer data.
    log.warning(
        logs.WEBHOOK_REJECTED,
        extra={"reason": rejected.reason, "status": rejected.status,
               "remote_addr": request.remote_addr,
               "content_length": request.content_length},
    )
    return Response(f'{{"error": "{rejected.status}"}}', rejected.status,
                    mimetype="application/json")
