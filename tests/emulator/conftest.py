"""Fixtures: one emulator per session (port 0, no rate ceiling, fast webhook retries), reset per
test; a stripe-python client pointed at it; its HTTP controls; a tiny webhook receiver."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import stripe

from billing.emulator import EmulatorServer

WEBHOOK_SECRET = "whsec_test_emulator_secret"


class Controls:
    """The `/_emulator/` routes over plain HTTP, as any test or script would call them."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.call("POST", "/_emulator/" + path, body or {})

    def get(self, path: str) -> Any:
        return self.call("GET", "/_emulator/" + path)

    def advance(self, seconds: int) -> int:
        return self.post("clock", {"advance": seconds})["now"]

    def now(self) -> int:
        return self.get("clock")["now"]

    def stats(self) -> dict[str, Any]:
        return self.get("stats")

    def fault(self, **rule: Any) -> Any:
        return self.post("faults", rule)

    def flush_webhooks(self, timeout: float = 5) -> Any:
        return self.post("webhooks/flush", {"timeout": timeout})


@pytest.fixture(scope="session")
def _emulator_server() -> Iterator[EmulatorServer]:
    server = EmulatorServer(port=0, rate_limits="off", webhook_backoff_ms=10)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def stripe_emulator(_emulator_server: EmulatorServer) -> EmulatorServer:
    Controls(_emulator_server.url).post("reset")
    return _emulator_server


@pytest.fixture
def emulator(stripe_emulator: EmulatorServer) -> Controls:
    return Controls(stripe_emulator.url)


@pytest.fixture
def sync_meter_validation(emulator: Controls) -> Controls:
    """Meter events checked at once (a 400 per failed check), not asynchronously as live
    Stripe does and this emulator does by default."""
    emulator.post("settings", {"meter_validation": "sync"})
    return emulator


def make_client(url: str, key: str = "sk_test_emulator", retries: int = 0) -> stripe.StripeClient:
    return stripe.StripeClient(
        key,
        base_addresses={"api": url, "meter_events": url, "files": url, "connect": url},
        max_network_retries=retries,
    )


@pytest.fixture
def stripe_client(stripe_emulator: EmulatorServer) -> stripe.StripeClient:
    return make_client(stripe_emulator.url)


@pytest.fixture
def client_factory(stripe_emulator: EmulatorServer) -> Any:
    """`client_factory(key=..., retries=...)`: another client on the same emulator."""
    return lambda **kwargs: make_client(stripe_emulator.url, **kwargs)


class Receiver:
    """Collects webhook deliveries; answers `statuses` in turn, then 200."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.delay = 0.0  # seconds to wait before answering
        self._cv = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                time.sleep(receiver.delay)
                with receiver._cv:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    if status < 300:
                        receiver.received.append((dict(self.headers.items()), body))
                    receiver._cv.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 5) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self.received) < count and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
            return list(self.received)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_receiver(emulator: Controls) -> Iterator[Receiver]:
    """A receiver wired to the emulator with WEBHOOK_SECRET."""
    receiver = Receiver()
    emulator.post("webhooks", {"url": receiver.url, "secret": WEBHOOK_SECRET})
    yield receiver
    emulator.post("webhooks", {"url": None})
    receiver.close()


class Metered:
    """A customer subscribed to a metered price (0.5 cent per unit) on meter `api_calls`."""

    def __init__(self, client: stripe.StripeClient) -> None:
        self.customer = client.v1.customers.create({"email": "ops@example.com"})
        self.meter = client.v1.billing.meters.create(
            {
                "display_name": "API calls",
                "event_name": "api_calls",
                "default_aggregation": {"formula": "sum"},
            }
        )
        self.product = client.v1.products.create({"name": "API"})
        self.price = client.v1.prices.create(
            {
                "currency": "usd",
                "unit_amount_decimal": "0.5",
                "product": self.product.id,
                "recurring": {"interval": "month", "usage_type": "metered", "meter": self.meter.id},
            }
        )
        self.subscription = client.v1.subscriptions.create(
            {"customer": self.customer.id, "items": [{"price": self.price.id}]}
        )


@pytest.fixture
def metered(stripe_client: stripe.StripeClient) -> Metered:
    return Metered(stripe_client)
