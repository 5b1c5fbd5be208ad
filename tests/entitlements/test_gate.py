"""The workspace gate and the upgrade flow, through the demo host app and Flask's test client.

Checkout completion is the emulator's; linking the customer (what the webhook handler of
`checkout.session.completed` does) is written directly here, so these tests stay about the gate.
The real webhook flow is exercised end to end in tests/e2e.
"""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from flask import Blueprint, Flask

from billing import Billing
from billing.demo.host_app import create_demo_app
from billing.entitlements import SAAS_FEATURE
from billing.entitlements.gate import SaasGate, require_saas
from billing.entitlements.service import grant_manual, refresh_from_stripe, revoke_manual
from billing.models import BillingAccount
from billing.runtime import EXTENSION_KEY

BOOKING_URL = "https://booking.example.test/demo"


@pytest.fixture
def make_app(billing_settings):
    apps: list[Flask] = []

    def build(**changes):
        settings = billing_settings.replace(saas_workspace_booking_url=BOOKING_URL, **changes)
        app = create_demo_app(settings, secret_key="gate-tests")
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["billing"].get().close()


@pytest.fixture
def booking_app(make_app):
    return make_app()


@pytest.fixture
def upgrade_app(make_app, saas_catalog):
    return make_app(saas_price_id=saas_catalog.price_id)


def signed_in(app: Flask, organization_id: int):
    client = app.test_client()
    with client.session_transaction() as session:
        session["organization_id"] = organization_id
    return client


def csrf_token(client) -> str:
    page = client.get("/billing/saas/upgrade?next=/workspace").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def start_checkout(client, **form) -> str:
    """POST the upgrade form; the Checkout Session id the browser is sent to."""
    response = client.post(
        "/billing/saas/checkout",
        data={"csrf_token": csrf_token(client), "next": "/workspace", **form},
    )
    assert response.status_code == 303, response.get_data(as_text=True)
    return response.headers["Location"].rsplit("/", 1)[1]


def checkout_session(runtime, session_id: str):
    return runtime.stripe.client.v1.checkout.sessions.retrieve(session_id)


def complete_and_link(emulator, runtime, session_id: str) -> None:
    """The emulator completes the payment; the org is linked and refreshed as the webhooks do."""
    completed = emulator.control("POST", f"checkout_sessions/{session_id}/complete", {})
    organization_id = int(completed["client_reference_id"])
    with runtime.session_factory.begin() as session:
        session.merge(
            BillingAccount(
                organization_id=organization_id, stripe_customer_id=completed["customer"]
            )
        )
    refresh_from_stripe(runtime, organization_id)


class TestEntitled:
    def test_an_entitled_organization_goes_through(self, booking_app, billing_runtime):
        grant_manual(billing_runtime, 1, SAAS_FEATURE)
        response = signed_in(booking_app, 1).get("/workspace")
        assert response.status_code == 200
        assert "Workspace of Acme Corp" in response.get_data(as_text=True)

    def test_upgrade_pages_send_an_entitled_organization_on(self, upgrade_app, billing_runtime):
        grant_manual(billing_runtime, 1, SAAS_FEATURE)
        client = signed_in(upgrade_app, 1)
        for path in ("/billing/saas/upgrade?next=/workspace", "/billing/saas/checkout/success"):
            response = client.get(path)
            assert response.status_code == 302 and response.headers["Location"] == "/workspace"

    def test_revocation_locks_the_workspace_again(self, booking_app, billing_runtime):
        grant_manual(billing_runtime, 1, SAAS_FEATURE)
        client = signed_in(booking_app, 1)
        assert client.get("/workspace").status_code == 200
        revoke_manual(billing_runtime, 1, SAAS_FEATURE)
        response = client.get("/workspace")
        assert response.status_code == 302 and response.headers["Location"] == BOOKING_URL

    def test_one_entitlement_query_per_request(self, booking_app, billing_runtime):
        """The check is cached per request: several guarded calls, one lookup."""
        grant_manual(billing_runtime, 1, SAAS_FEATURE)
        engine = booking_app.extensions["billing"].get().engine
        statements: list[str] = []

        def record(conn, cursor, statement, *args):
            statements.append(statement)

        sa.event.listen(engine, "before_cursor_execute", record)
        try:
            with booking_app.test_request_context("/workspace"):
                from flask import session

                from billing.entitlements.gate import guard_request

                session["organization_id"] = 1
                assert guard_request() is None
                assert guard_request() is None
        finally:
            sa.event.remove(engine, "before_cursor_execute", record)
        assert len([s for s in statements if "FROM entitlements" in s]) == 1

    def test_a_stripe_outage_never_locks_out_an_entitled_organization(
        self, make_app, saas_catalog, emulator
    ):
        runtime = saas_catalog.runtime
        saas_catalog.subscribe(saas_catalog.customer_for(1))
        refresh_from_stripe(runtime, 1)
        app = make_app(saas_price_id=saas_catalog.price_id)
        emulator.faults({"path": "*", "status": 503})
        response = signed_in(app, 1).get("/workspace")
        assert response.status_code == 200
        # Even with no Stripe at all configured, the gate answers from the table.
        offline = make_app(
            saas_price_id=saas_catalog.price_id, stripe_api_base="http://127.0.0.1:9"
        )
        assert signed_in(offline, 1).get("/workspace").status_code == 200


class TestBookingMode:
    def test_a_gated_organization_is_sent_to_the_booking_page(self, booking_app):
        response = signed_in(booking_app, 2).get("/workspace")
        assert response.status_code == 302
        assert response.headers["Location"] == BOOKING_URL

    def test_the_upgrade_page_and_checkout_also_lead_to_booking(self, booking_app, emulator):
        client = signed_in(booking_app, 2)
        assert client.get("/billing/saas/upgrade").headers["Location"] == BOOKING_URL
        sign_in_page = client.get("/").get_data(as_text=True)  # the demo's forms carry a token
        token = re.search(r'name="csrf_token" value="([^"]+)"', sign_in_page).group(1)
        response = client.post("/billing/saas/checkout", data={"csrf_token": token})
        assert response.status_code == 303 and response.headers["Location"] == BOOKING_URL
        assert "POST /v1/checkout/sessions" not in emulator.stats()["requests"]

    def test_an_api_call_gets_403_json_not_a_redirect(self, booking_app):
        response = signed_in(booking_app, 2).get(
            "/workspace", headers={"Accept": "application/json"}
        )
        assert response.status_code == 403
        assert response.get_json() == {
            "error": "saas_entitlement_required",
            "mode": "booking",
            "url": BOOKING_URL,
        }

    def test_not_signed_in_is_401_for_the_host_to_handle(self, booking_app):
        app = Flask("bare")
        with pytest.raises(RuntimeError, match=r"Billing\(app\), then the gate"):
            SaasGate(app, current_organization=lambda: None)
        Billing(app, booking_app.extensions[EXTENSION_KEY].get().settings)
        SaasGate(app, current_organization=lambda: None)

        @app.get("/workspace")
        @require_saas
        def workspace():
            return "never"

        assert app.test_client().get("/workspace").status_code == 401
        # The demo host app turns it into its sign-in page.
        assert booking_app.test_client().get("/workspace").headers["Location"] == "/"


class TestUpgradeMode:
    def test_a_gated_organization_sees_the_upgrade_page(self, upgrade_app):
        client = signed_in(upgrade_app, 2)
        response = client.get("/workspace")
        assert response.status_code == 302
        assert response.headers["Location"] == "/billing/saas/upgrade?next=/workspace"
        page = client.get(response.headers["Location"])
        text = page.get_data(as_text=True)
        assert page.status_code == 200
        assert "Your workspace needs the SaaS plan" in text
        assert 'action="/billing/saas/checkout"' in text and 'name="csrf_token"' in text

    def test_an_app_mounted_under_a_prefix_keeps_it(self, upgrade_app):
        client = signed_in(upgrade_app, 2)
        response = client.get("/workspace?tab=2", base_url="http://localhost/app")
        assert response.headers["Location"] == (
            "/app/billing/saas/upgrade?next=/app/workspace?tab%3D2"
        )

    def test_checkout_subscribes_the_signed_in_organization(self, upgrade_app, saas_catalog):
        runtime = saas_catalog.runtime
        client = signed_in(upgrade_app, 2)
        session_id = start_checkout(client)
        created = checkout_session(runtime, session_id)
        assert created.mode == "subscription"
        assert created.client_reference_id == "2"
        assert created.customer is None  # no customer yet: Checkout creates one
        assert created.metadata["organization_id"] == "2"
        assert (
            created.success_url == "http://localhost/billing/saas/checkout/success?next=/workspace"
        )
        assert created.cancel_url == "http://localhost/billing/saas/checkout/cancel?next=/workspace"
        lines = runtime.stripe.client.v1.checkout.sessions.line_items.list(session_id)
        assert [line.price.id for line in lines.data] == [saas_catalog.price_id]

    def test_checkout_reuses_the_organizations_customer(self, upgrade_app, saas_catalog):
        customer = saas_catalog.customer_for(2)
        session_id = start_checkout(signed_in(upgrade_app, 2))
        assert checkout_session(saas_catalog.runtime, session_id).customer == customer

    def test_public_base_url_is_used_for_stripes_return_urls(self, make_app, saas_catalog):
        app = make_app(
            saas_price_id=saas_catalog.price_id, saas_public_base_url="https://app.example.com"
        )
        created = checkout_session(saas_catalog.runtime, start_checkout(signed_in(app, 2)))
        assert created.success_url.startswith("https://app.example.com/billing/saas/checkout/")

    def test_a_tampered_organization_id_in_the_form_is_ignored(self, upgrade_app, saas_catalog):
        session_id = start_checkout(signed_in(upgrade_app, 2), organization_id="3")
        assert checkout_session(saas_catalog.runtime, session_id).client_reference_id == "2"

    @pytest.mark.parametrize("token", [None, "forged-token"])
    def test_checkout_without_the_csrf_token_is_refused(
        self, upgrade_app, saas_catalog, emulator, token
    ):
        client = signed_in(upgrade_app, 2)
        csrf_token(client)  # the session has a token; the post does not carry it
        form = {"next": "/workspace"} if token is None else {"csrf_token": token}
        response = client.post("/billing/saas/checkout", data=form)
        assert response.status_code == 400
        assert "This page expired before you clicked" in response.get_data(as_text=True)
        assert "POST /v1/checkout/sessions" not in emulator.stats()["requests"]

    def test_checkout_is_post_only(self, upgrade_app):
        assert signed_in(upgrade_app, 2).get("/billing/saas/checkout").status_code == 405

    def test_a_stripe_error_shows_the_page_again_with_a_message(
        self, upgrade_app, saas_catalog, emulator
    ):
        client = signed_in(upgrade_app, 2)
        token = csrf_token(client)
        emulator.faults({"path": "/v1/checkout/sessions", "status": 400})
        response = client.post("/billing/saas/checkout", data={"csrf_token": token})
        assert response.status_code == 503
        assert "Stripe could not start the checkout just now" in response.get_data(as_text=True)

    def test_cancel_returns_to_the_upgrade_page(self, upgrade_app):
        client = signed_in(upgrade_app, 2)
        response = client.get("/billing/saas/checkout/cancel?next=/workspace")
        assert response.headers["Location"] == "/billing/saas/upgrade?next=/workspace&canceled=1"
        page = client.get(response.headers["Location"]).get_data(as_text=True)
        assert "Checkout was canceled" in page

    @pytest.mark.parametrize(
        "next_path",
        ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:x"],
    )
    def test_next_never_leaves_the_site(self, upgrade_app, billing_runtime, next_path):
        grant_manual(billing_runtime, 2, SAAS_FEATURE)
        response = signed_in(upgrade_app, 2).get(
            "/billing/saas/upgrade", query_string={"next": next_path}
        )
        assert response.headers["Location"] == "/workspace"


class TestUnlock:
    def test_the_success_url_alone_unlocks_nothing(self, upgrade_app, saas_catalog):
        client = signed_in(upgrade_app, 2)
        start_checkout(client)  # started, never paid
        page = client.get("/billing/saas/checkout/success?next=/workspace")
        assert page.status_code == 200
        assert "Activating your workspace" in page.get_data(as_text=True)
        assert client.get("/billing/saas/status").get_json() == {"entitled": False}
        assert client.get("/workspace").status_code == 302

    def test_replaying_another_organizations_session_unlocks_nothing(
        self, upgrade_app, saas_catalog, emulator
    ):
        runtime = saas_catalog.runtime
        paid_by_3 = start_checkout(signed_in(upgrade_app, 3))
        complete_and_link(emulator, runtime, paid_by_3)
        other = signed_in(upgrade_app, 2)
        page = other.get(f"/billing/saas/checkout/success?session_id={paid_by_3}&next=/workspace")
        assert page.status_code == 200  # still waiting: the session id is not looked at
        assert other.get("/billing/saas/status").get_json() == {"entitled": False}
        assert other.get("/workspace").status_code == 302
        assert signed_in(upgrade_app, 3).get("/workspace").status_code == 200

    def test_the_entitlement_set_after_payment_opens_the_workspace(
        self, upgrade_app, saas_catalog, emulator
    ):
        client = signed_in(upgrade_app, 2)
        session_id = start_checkout(client)
        assert client.get("/billing/saas/status").get_json() == {"entitled": False}
        complete_and_link(emulator, saas_catalog.runtime, session_id)
        status = client.get("/billing/saas/status")
        assert status.get_json() == {"entitled": True}
        assert status.headers["Cache-Control"] == "no-store"
        success = client.get("/billing/saas/checkout/success?next=/workspace")
        assert success.status_code == 302 and success.headers["Location"] == "/workspace"
        assert client.get("/workspace").status_code == 200

    def test_the_waiting_page_polls_with_a_timeout(self, make_app, saas_catalog):
        app = make_app(saas_price_id=saas_catalog.price_id, saas_unlock_wait_seconds=7)
        page = signed_in(app, 2).get("/billing/saas/checkout/success").get_data(as_text=True)
        assert 'var statusUrl = "/billing/saas/status"' in page
        assert "Date.now() + 7 * 1000" in page
        assert "This is taking longer than usual" in page


class TestBlueprintGuard:
    def test_protect_guards_every_route_of_a_blueprint(self, billing_settings, billing_runtime):
        app = Flask("host")
        Billing(app, billing_settings.replace(saas_workspace_booking_url=BOOKING_URL))
        gate = SaasGate(app, current_organization=lambda: 5, workspace_url="/ws/")
        workspace = gate.protect(Blueprint("ws", __name__))
        workspace.add_url_rule("/", "home", lambda: "home")
        workspace.add_url_rule("/reports", "reports", lambda: "reports")
        workspace.add_url_rule("/save", "save", lambda: "saved", methods=["POST"])
        app.register_blueprint(workspace, url_prefix="/ws")
        client = app.test_client()
        assert client.get("/ws/reports").headers["Location"] == BOOKING_URL
        refused = client.post("/ws/save")  # a form post or API write: 403, never a redirect
        assert refused.status_code == 403
        assert refused.get_json()["error"] == "saas_entitlement_required"
        grant_manual(billing_runtime, 5, SAAS_FEATURE)
        assert client.get("/ws/reports").get_data(as_text=True) == "reports"
        assert client.post("/ws/save").get_data(as_text=True) == "saved"
        app.extensions["billing"].get().close()
