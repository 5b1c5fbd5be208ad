"""The gateway's one HTTP session: the environment's proxy settings still route every Stripe
call although the session reads the environment only once, when the gateway is built."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import requests
import stripe

from billing.models import utcnow
from billing.stripe_gateway import MeterEvent, MeterEventOutcome, StripeGateway, http_session

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


class Proxy(ThreadingHTTPServer):
    """A forwarding HTTP proxy that notes every URL it was asked for."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.seen: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(BaseHTTPRequestHandler):
    server: Proxy

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def _forward(self) -> None:
        self.server.seen.append(self.path)  # a proxy is asked for the absolute URL
        target = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "proxy-connection"}
        path = target.path + (f"?{target.query}" if target.query else "")
        upstream.request(self.command, path, body or None, headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        upstream.close()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    server = Proxy()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def clean_environment(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def _event(customer: str, identifier: str) -> MeterEvent:
    return MeterEvent(
        event_name="api_call",
        stripe_customer_id=customer,
        value=3,
        timestamp=utcnow() - timedelta(minutes=5),
        identifier=identifier,
        idempotency_key=f"key-{identifier}",
    )


def test_the_environments_proxy_carries_every_call(
    billing_settings, emulator, proxy, clean_environment
):
    clean_environment.setenv("HTTP_PROXY", proxy.url)
    gateway = StripeGateway.from_settings(billing_settings)
    clean_environment.delenv("HTTP_PROXY")  # read when the gateway was built, not per call

    customer = gateway.create_customer("Org 1", 1).id
    assert gateway.send_meter_event(_event(customer, "proxied-1")) == MeterEventOutcome.ACCEPTED
    assert [urlsplit(url).path for url in proxy.seen] == [
        "/v1/customers",
        "/v1/billing/meter_events",
    ]
    assert {urlsplit(url).netloc for url in proxy.seen} == {urlsplit(emulator.url).netloc}
    assert emulator.billed() == {customer: {"api_call": 3}}


def test_no_proxy_naming_the_host_bypasses_the_proxy(
    billing_settings, emulator, proxy, clean_environment
):
    clean_environment.setenv("HTTP_PROXY", proxy.url)
    clean_environment.setenv("NO_PROXY", "127.0.0.1")
    gateway = StripeGateway.from_settings(billing_settings)
    customer = gateway.create_customer("Org 2", 2).id
    assert gateway.send_meter_event(_event(customer, "direct-1")) == MeterEventOutcome.ACCEPTED
    assert proxy.seen == [] and emulator.billed() == {customer: {"api_call": 3}}


def test_without_proxy_variables_calls_go_direct(billing_settings, emulator, clean_environment):
    session = http_session([emulator.url], connections=8)
    assert session.proxies == {} and session.trust_env is False


def test_the_ca_bundle_stripe_calls_verify_with_is_unchanged(clean_environment, tmp_path):
    """stripe-python passes its own bundle as `verify`, which REQUESTS_CA_BUNDLE never
    replaced; reading the environment once keeps it so."""
    clean_environment.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "corporate.pem"))
    url = stripe.DEFAULT_API_BASE
    trusting = requests.Session()
    ours = http_session([url], connections=8)
    for session in (trusting, ours):
        settings = session.merge_environment_settings(url, {}, None, stripe.ca_bundle_path, None)
        assert settings["verify"] == stripe.ca_bundle_path
