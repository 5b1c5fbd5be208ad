"""Webhook fixtures: the real Flask app served over HTTP on loopback, a real Celery worker (an
in-process thread on the session's Redis queue), signed deliveries and captured log records."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests
import stripe
from flask import Flask
from werkzeug.serving import make_server

from billing import logs
from billing.app import EXTENSION_KEY, Billing, create_app
from billing.config import Settings
from billing.models import WebhookEvent
from billing.runtime import Runtime, set_runtime

SECRET = "whsec_webhooktests0000"
OLD_SECRET = "whsec_webhooktests_rotated_out"


def standalone_app(runtime: Runtime) -> Flask:
    """`create_app()` sharing the test's runtime (engine pool, truncated tables) instead of
    building another."""
    app = create_app(runtime.settings)
    app.extensions[EXTENSION_KEY]._runtime = runtime
    return app


def host_app(runtime: Runtime) -> Flask:
    """A host's own Flask app that adopted billing with `Billing(app)`, on the test's runtime."""
    host = Flask("host")
    Billing(host, runtime.settings)
    host.extensions[EXTENSION_KEY]._runtime = runtime
    return host


class AppServer:
    """`create_app()` behind werkzeug's threaded server on an ephemeral port."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.server = make_server("127.0.0.1", 0, standalone_app(runtime), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}{runtime.settings.webhook_path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sign(body: bytes, secret: str = SECRET, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(
        body.decode(), secret, timestamp=timestamp
    )


def make_event(event_type: str = "test.event", event_id: str | None = None, **obj: Any) -> bytes:
    event = {
        "id": event_id or f"evt_{time.time_ns()}",
        "object": "event",
        "api_version": stripe.api_version,
        "created": int(time.time()),
        "data": {"object": obj or {"id": "obj_1", "object": "thing"}},
        "livemode": False,
        "type": event_type,
    }
    return json.dumps(event).encode()


def post(url: str, body: bytes, signature: str | None = "sign", **kwargs: Any) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if signature == "sign":
        signature = sign(body)
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return requests.post(url, data=body, headers=headers, timeout=30, **kwargs)


@pytest.fixture
def webhook_settings(billing_settings: Settings) -> Settings:
    return billing_settings.replace(stripe_webhook_secret=f"{SECRET},{OLD_SECRET}")


@pytest.fixture
def webhook_runtime(make_runtime, webhook_settings: Settings) -> Iterator[Runtime]:
    runtime = make_runtime(webhook_settings)
    set_runtime(runtime)  # the worker thread's runtime
    yield runtime
    set_runtime(None)


@pytest.fixture
def app_server(webhook_runtime: Runtime) -> Iterator[AppServer]:
    server = AppServer(webhook_runtime)
    yield server
    server.close()


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.addFilter(logs.ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, message: str) -> list[logging.LogRecord]:
        return [r for r in list(self.records) if r.getMessage() == message]


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logs.get_logger()
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


def queued_messages(broker_client: redis.Redis, queue: str) -> list[dict]:
    """The queue's messages, oldest first (kombu's Redis transport LPUSHes, workers BRPOP)."""
    return [json.loads(raw) for raw in reversed(broker_client.lrange(queue, 0, -1))]


def queued_event_ids(broker_client: redis.Redis, queue: str) -> list[str]:
    """The event id argument of each queued processing task, oldest first."""
    return [
        json.loads(base64.b64decode(m["body"]))[0][0] for m in queued_messages(broker_client, queue)
    ]


@pytest.fixture
def broker_client(webhook_settings: Settings) -> Iterator[redis.Redis]:
    """The broker's Redis database, with this session's queue emptied before and after."""
    client = redis.Redis.from_url(webhook_settings.celery_broker_url)
    client.delete(webhook_settings.billing_queue)
    yield client
    client.delete(webhook_settings.billing_queue)
    client.close()


def rows(runtime: Runtime) -> list[WebhookEvent]:
    with runtime.session_factory() as session:
        return list(session.query(WebhookEvent).order_by(WebhookEvent.id))


def wait_until(condition: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def statuses(runtime: Runtime) -> dict[str, str]:
    return {row.stripe_event_id: row.status for row in rows(runtime)}


class Delivering:
    """The emulator POSTing its signed events to the app over HTTP, and ways to wait for them."""

    def __init__(self, emulator, server: AppServer) -> None:
        self.emulator = emulator
        self.runtime = server.runtime
        self.url = server.url

    def configure(self, **config: Any) -> None:
        self.emulator.control("POST", "webhooks", config)

    def settle(self, timeout: float = 30) -> dict[str, str]:
        """Every delivery answered and every stored event finished by the worker."""
        assert self.emulator.control("POST", "webhooks/flush", {"timeout": timeout})["idle"]
        busy = ("received", "processing")
        wait_until(
            lambda: not any(s in busy for s in statuses(self.runtime).values()),
            timeout,
            "the worker to finish every stored event",
        )
        return statuses(self.runtime)

    def deliveries(self) -> list[dict[str, Any]]:
        return self.emulator.control("GET", "webhooks")["deliveries"]


@pytest.fixture
def delivering(emulator, app_server, worker) -> Iterator[Delivering]:
    emulator.control(
        "POST", "webhooks", {"url": app_server.url, "secret": SECRET, "backoff_ms": 20}
    )
    yield Delivering(emulator, app_server)
    emulator.control("POST", "webhooks", {"url": None})
