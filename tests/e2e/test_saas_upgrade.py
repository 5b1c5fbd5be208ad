"""End to end in a real browser: a gated organization upgrades through Stripe Checkout.

Everything is real except Stripe, which is the emulator: Debian's Chromium (Playwright) clicks
through the demo host app served over HTTP; the emulator's payment page completes the Checkout
Session and the emulator POSTs its signed webhooks to the app's real ingest view
(`/stripe/webhook`); a real Celery worker (an in-process thread on the Redis broker) runs the
real processing task, whose handlers link the customer and store the `saas` entitlement; the
success page, polling, then opens the workspace. A screenshot of each step goes to
test-artifacts/e2e/<test>/.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from billing.entitlements import SAAS_FEATURE
from billing.entitlements.service import has_entitlement
from billing.models import BillingAccount, Entitlement, WebhookEvent

pytestmark = pytest.mark.e2e

STEP_TIMEOUT_MS = 30_000


@pytest.fixture
def upgrade_server(serve_upgrade_app):
    return serve_upgrade_app(saas_unlock_wait_seconds=30)


class Steps:
    """Screenshots named by step, and how long each step took."""

    def __init__(self, page, folder: Path) -> None:
        self.page = page
        self.folder = folder
        self.started = self.last = time.monotonic()
        self.durations: dict[str, float] = {}

    def shot(self, name: str) -> None:
        now = time.monotonic()
        self.durations[name] = round(now - self.last, 3)
        self.last = now
        self.page.screenshot(path=str(self.folder / f"{name}.png"), full_page=True)

    def save(self) -> float:
        total = round(time.monotonic() - self.started, 3)
        (self.folder / "timings.json").write_text(
            json.dumps({"steps_seconds": self.durations, "total_seconds": total}, indent=2)
        )
        return total


def test_a_gated_organization_upgrades_and_the_workspace_unlocks(
    chromium, artifacts, upgrade_server, emulator
):
    server, runtime = upgrade_server
    page = chromium.new_page(viewport={"width": 1000, "height": 700})
    page.set_default_timeout(STEP_TIMEOUT_MS)
    steps = Steps(page, artifacts)

    page.goto(server.url + "/")
    page.click("#sign-in-2")  # organization 2 (Globex): no `saas` yet
    page.wait_for_url(re.compile(r"/billing/saas/upgrade\?next=(?:%2F|/)workspace$"))
    assert page.inner_text("h1") == "Your workspace needs the SaaS plan"
    steps.shot("01-upgrade-page")

    page.click("#start-checkout")
    page.wait_for_url(re.compile(re.escape(emulator.url) + r"/_emulator/checkout/cs_test_\w+$"))
    assert "Emulated Stripe Checkout" in page.inner_text("h1")
    session_id = page.url.rsplit("/", 1)[1]
    steps.shot("02-stripe-checkout")

    page.click("button[type=submit]")  # pay: the emulator completes the session
    page.wait_for_url(re.compile(r"/billing/saas/checkout/success\?next=(?:%2F|/)workspace$"))
    assert "Activating your workspace" in page.inner_text("#waiting")
    assert not has_entitlement(runtime, 2, SAAS_FEATURE)  # the success URL unlocked nothing
    steps.shot("03-waiting-for-stripe")

    page.wait_for_url(server.url + "/workspace")  # the page's polling saw `saas` and moved on
    assert page.inner_text("#workspace") == "Workspace of Globex"
    steps.shot("04-workspace")
    total = steps.save()
    print(f"\ne2e upgrade flow: {total:.2f}s {steps.durations}")

    # What unlocked it: the webhook flow, not the browser.
    checkout = runtime.stripe.client.v1.checkout.sessions.retrieve(session_id)
    with runtime.session_factory() as session:
        account = session.get(BillingAccount, 2)
        assert account is not None and account.stripe_customer_id == checkout.customer
        sources = session.execute(
            sa.select(Entitlement.lookup_key, Entitlement.source, Entitlement.active).where(
                Entitlement.organization_id == 2
            )
        ).all()
        processed = set(
            session.scalars(sa.select(WebhookEvent.type).where(WebhookEvent.status == "processed"))
        )
    assert sources == [(SAAS_FEATURE, "stripe", True)]
    assert {"checkout.session.completed", "entitlements.active_entitlement_summary.updated"} <= (
        processed
    )


def test_canceling_checkout_returns_to_the_upgrade_page(
    chromium, artifacts, upgrade_server, emulator
):
    server, runtime = upgrade_server
    page = chromium.new_page(viewport={"width": 1000, "height": 700})
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(server.url + "/")
    page.click("#sign-in-3")
    page.click("#start-checkout")
    page.wait_for_url(re.compile(re.escape(emulator.url) + r"/_emulator/checkout/"))
    page.click("text=Cancel")
    page.wait_for_url(re.compile(r"/billing/saas/upgrade\?next=(?:%2F|/)workspace&canceled=1$"))
    assert "Checkout was canceled" in page.inner_text("#checkout-canceled")
    page.screenshot(path=str(artifacts / "01-canceled.png"), full_page=True)
    page.goto(server.url + "/workspace")
    assert "/billing/saas/upgrade" in page.url  # still locked
    assert not has_entitlement(runtime, 3, SAAS_FEATURE)


def test_without_stripes_confirmation_the_success_page_gives_up_kindly(
    chromium, artifacts, serve_upgrade_app, emulator
):
    """No webhook ever arrives (delivery off): the page stops polling and says so."""
    server, runtime = serve_upgrade_app(deliver_webhooks=False, saas_unlock_wait_seconds=2)
    page = chromium.new_page(viewport={"width": 1000, "height": 700})
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(server.url + "/")
    page.click("#sign-in-2")
    page.click("#start-checkout")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/billing/saas/checkout/success"))
    page.wait_for_selector("#slow", state="visible", timeout=10_000)
    assert "This is taking longer than usual" in page.inner_text("#slow")
    assert page.is_hidden("#waiting")
    page.screenshot(path=str(artifacts / "01-taking-longer.png"), full_page=True)
    assert not has_entitlement(runtime, 2, SAAS_FEATURE)
