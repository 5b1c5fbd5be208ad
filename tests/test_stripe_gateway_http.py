"""The gateway's HTTP client (libcurl, a handle per thread): the environment's proxy settings,
read by requests' rules when the gateway is built, route every Stripe call."""

from __future__ import annotations

import http.client
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import stripe

from billing.models import utcnow
from billing.stripe_gateway import (
    MeterEvent,
    MeterEventOutcome,
    PerThreadCurl,
    StripeGateway,
    TransientStripeError,
    environment_proxies,
)

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
    assert environment_proxies([emulator.url, stripe.DEFAULT_API_BASE]) == {}
    gateway = StripeGateway.from_settings(billing_settings)
    customer = gateway.create_customer("Org 3", 3).id
    assert gateway.send_meter_event(_event(customer, "direct-2")) == MeterEventOutcome.ACCEPTED


def test_an_upper_case_http_proxy_is_honoured_as_requests_would(clean_environment):
    """libcurl alone ignores HTTP_PROXY (upper case) for http URLs; billing follows requests."""
    clean_environment.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    clean_environment.setenv("HTTPS_PROXY", "http://tls-proxy.internal:3128")
    assert environment_proxies(["http://127.0.0.1:12111", stripe.DEFAULT_API_BASE]) == {
        "http": "http://proxy.internal:3128",
        "https": "http://tls-proxy.internal:3128",
    }


def test_each_thread_has_its_own_handle(billing_settings, emulator, clean_environment):
    """A pycurl handle must not serve two threads at once: four threads calling at once each
    get their own, and every call lands."""
    gateway = StripeGateway.from_settings(billing_settings)
    client = gateway.http_client
    assert isinstance(client, PerThreadCurl)
    customer = gateway.create_customer("Org 4", 4).id
    handles: list[object] = []
    errors: list[BaseException] = []

    def calls(thread: int) -> None:
        try:
            for n in range(20):
                event = _event(customer, f"thread-{thread}-{n}")
                assert gateway.send_meter_event(event) == MeterEventOutcome.ACCEPTED
            handles.append(client.handle())
        except BaseException as error:  # the thread's failure, for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=calls, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({id(handle) for handle in handles}) == 4
    assert emulator.billed() == {customer: {"api_call": 3 * 20 * 4}}


@pytest.fixture
def self_signed_https(tmp_path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate: (base URL, its cert)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    request = [
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
    ]
    names = ["-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(["openssl", *request, *names, *files], check=True, capture_output=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


def test_stripe_calls_verify_with_stripes_bundle_whatever_the_environment_says(
    billing_settings, self_signed_https, clean_environment
):
    """The certificate of a host is checked against stripe-python's own CA bundle: a bundle
    named by REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE (here, one that trusts the host) is ignored,
    so the call is refused before anything is sent."""
    url, cert = self_signed_https
    clean_environment.setenv("REQUESTS_CA_BUNDLE", str(cert))
    clean_environment.setenv("CURL_CA_BUNDLE", str(cert))
    gateway = StripeGateway.from_settings(billing_settings.replace(stripe_api_base=url))
    with pytest.raises(TransientStripeError, match="SSL certificate"):
        gateway.create_customer("Org 5", 5)


def test_a_gevent_patched_process_calls_stripe_through_requests(billing_settings):
    """Under gunicorn's gevent workers a Stripe call made in a web request must yield to the
    other greenlets while it waits: libcurl cannot, so such a process uses requests."""
    code = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import sys\n"
        "from billing.config import Settings\n"
        "from billing.stripe_gateway import StripeGateway\n"
        "gateway = StripeGateway.from_settings(Settings(stripe_secret_key='sk_test_x1'))\n"
        "print(type(gateway.http_client).__name__)\n"
    )
    patched = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert patched.stdout.strip() == "RequestsClient", patched.stderr
    plain = StripeGateway.from_settings(billing_settings)
    assert isinstance(plain.http_client, PerThreadCurl)
