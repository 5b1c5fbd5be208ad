"""The webhook endpoint, whatever serves it: verify, store once, queue, answer. Nothing slow
happens here.

Two adapters call `receive`: the Flask view (`views.py`, what a host app gets from
`Billing(app)`) and, in the standalone app, a WSGI route in front of Flask (`DirectRoute`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, Any, Protocol

from werkzeug.wsgi import get_content_length, get_input_stream

from billing import logs, metrics
from billing.runtime import Runtime
from billing.webhooks import service
from billing.webhooks.publish import hand_off

log = logs.get_logger("billing.webhooks")

SIGNATURE_HEADER = "Stripe-Signature"
CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    @property
    def status_line(self) -> str:
        return f"{self.status} {HTTPStatus(self.status).phrase}"


def receive(
    runtime: Runtime,
    stream: IO[bytes],
    content_length: int | None,
    signature: str | None,
    remote_addr: str | None,
    hand_off: service.HandOff,
) -> Answer:
    """Answer one delivery: `stream` is the request body, `signature` its Stripe-Signature;
    `hand_off` queues an accepted event's processing (`publish.hand_off`)."""
    settings = runtime.settings
    try:
        body = _read_body(stream, content_length, settings.webhook_max_body_bytes)
        delivery = service.verify_delivery(body, signature, settings)
    except service.WebhookRejected as rejected:
        return _reject(rejected, remote_addr, content_length)
    event = delivery.event
    try:
        outcome = service.ingest(runtime, delivery, hand_off)
    except Exception as error:
        # Most likely not stored (the database refused or is gone). A 5xx makes Stripe deliver it
        # again: answered as a duplicate if it was stored after all, and queued by the sweep.
        log.exception(
            logs.WEBHOOK_SERVER_ERROR,
            extra={
                "event_id": event["id"],
                "event_type": event["type"],
                "error": type(error).__name__,
            },
        )
        return Answer(500, b'{"error": 500}')
    return Answer(200, b'{"received": true, "outcome": "%s"}' % outcome.value.encode())


def _read_body(stream: IO[bytes], content_length: int | None, limit: int) -> bytes:
    """The raw body (the signature covers its exact bytes); 413 past `limit`: a declared length
    is refused before reading, a chunked body after `limit` bytes."""
    if content_length is None or content_length <= limit:
        body = stream.read(limit + 1)
        if len(body) <= limit:
            return body
    raise service.WebhookRejected("body over the size limit", status=413, kind="too_large")


def _reject(
    rejected: service.WebhookRejected, remote_addr: str | None, content_length: int | None
) -> Answer:
    metrics.WEBHOOKS_REJECTED.labels(reason=rejected.kind).inc()
    # Never the body: it is attacker-controlled and may carry customer data.
    log.warning(
        logs.WEBHOOK_REJECTED,
        extra={
            "reason": rejected.reason,
            "status": rejected.status,
            "remote_addr": remote_addr,
            "content_length": content_length,
        },
    )
    return Answer(rejected.status, b'{"error": %d}' % rejected.status)


class RuntimeSource(Protocol):
    def get(self) -> Runtime: ...


class DirectRoute:
    """WSGI middleware of the standalone app: a POST to the webhook path is answered here,
    without Flask's request dispatch; every other request goes on to Flask. The standalone app
    registers no hooks of its own for this route to skip; a host app keeps the Flask view, so
    its own hooks and middleware see Stripe's deliveries."""

    def __init__(
        self,
        app: Any,
        path: str,
        runtime: RuntimeSource,
        make_hand_off: Callable[[Runtime], service.HandOff] = hand_off,
    ) -> None:
        self.app = app  # the WSGI app behind (Flask's `wsgi_app`)
        self.path = path
        self.runtime = runtime  # resolved per request: the app builds its runtime on first use
        self.make_hand_off = make_hand_off

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != self.path or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        runtime = self.runtime.get()
        answer = receive(
            runtime,
            get_input_stream(environ),
            get_content_length(environ),
            environ.get("HTTP_STRIPE_SIGNATURE"),
            environ.get("REMOTE_ADDR"),
            self.make_hand_off(runtime),
        )
        start_response(
            answer.status_line,
            [
                ("Content-Type", CONTENT_TYPE),
                ("Content-Length", str(len(answer.body))),
            ],
        )
        return [answer.body]
