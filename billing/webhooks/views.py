"""The webhook endpoint as a Flask view (what `Billing(app)` registers): an adapter over
`endpoint.receive`."""

from __future__ import annotations

from flask import Blueprint, Response, request

from billing.runtime import current_runtime
from billing.webhooks import endpoint
from billing.webhooks.publish import hand_off


def make_blueprint(path: str) -> Blueprint:
    blueprint = Blueprint("billing_webhooks", __name__)
    blueprint.add_url_rule(path, "receive", receive_webhook, methods=["POST"])
    return blueprint


def receive_webhook() -> Response:
    runtime = current_runtime()
    answer = endpoint.receive(
        runtime,
        request.stream,
        request.content_length,
        request.headers.get(endpoint.SIGNATURE_HEADER),
        request.remote_addr,
        hand_off(runtime),
    )
    return Response(answer.body, answer.status, mimetype=endpoint.CONTENT_TYPE)
