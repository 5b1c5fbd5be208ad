"""Browser fixtures: Debian's Chromium driven by Playwright, and the demo app served over HTTP."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from billing.app import EXTENSION_KEY
from billing.demo.host_app import create_demo_app
from billing.runtime import set_runtime

CHROMIUM = os.environ.get("BILLING_TEST_CHROMIUM", "/usr/bin/chromium")
# Root in a container: no sandbox; and nothing that phones home or updates itself.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "e2e"


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMIUM} missing: scripts/install_chromium.sh installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def artifacts(request) -> Path:
    """A clean folder for this test's screenshots: test-artifacts/e2e/<test name>/."""
    folder = ARTIFACTS / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


class LiveServer:
    """A WSGI app on a real port in a background thread (what the browser and Stripe call)."""

    def __init__(self, app) -> None:
        self.app = app
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join(10)


@pytest.fixture
def serve_upgrade_app(make_runtime, billing_settings, saas_catalog, emulator, worker):
    """Start the demo app in upgrade mode on a real port; the emulator's webhooks go to it."""
    stack = contextlib.ExitStack()

    def serve(*, deliver_webhooks: bool = True, **changes) -> tuple[LiveServer, object]:
        settings = billing_settings.replace(saas_price_id=saas_catalog.price_id, **changes)
        runtime = make_runtime(settings)
        set_runtime(runtime)  # what the worker thread's tasks use
        app = create_demo_app(settings, secret_key="e2e")
        app.extensions[EXTENSION_KEY]._runtime = runtime  # share the test's engine and tables
        server = stack.enter_context(LiveServer(app))
        if deliver_webhooks:
            webhooks = {
                "url": server.url + settings.webhook_path,
                "secret": settings.stripe_webhook_secret,
                # Held a moment, so the success page is seen waiting before the unlock.
                "hold_ms": 1500,
            }
            emulator.control("POST", "webhooks", webhooks)
        return server, runtime

    with stack:
        yield serve
    set_runtime(None)
