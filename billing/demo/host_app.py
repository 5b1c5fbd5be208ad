"""A minimal host app for the `saas` gate, to click through the upgrade flow locally.

Sign in as one of three organizations (the "host app's" identity: the session holds the org id),
open `/workspace`, and follow the gate: the booking page, or the upgrade page and Stripe Checkout
(the emulator's payment page) and back. `scripts/demo_saas.sh` runs it against the emulator.

    flask --app 'billing.demo.host_app:create_demo_app()' run
"""

from __future__ import annotations

import secrets

from flask import Flask, abort, redirect, render_template_string, request, session, url_for
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import generate_csrf

# Renamed: `flask --app` would take a module-level `create_app` for this app's factory.
from billing.app import create_app as create_billing_app
from billing.config import Settings
from billing.entitlements.gate import SaasGate, require_csrf, require_saas
from billing.logs import configure_logging

DEMO_ORGANIZATIONS = {1: "Acme Corp", 2: "Globex", 3: "Initech"}

_SIGN_IN = """{% extends "billing_saas/base.html" %}
{% block title %}Demo: sign in{% endblock %}
{% block content %}
  <h1>Demo host app</h1>
  <p>Sign in as an organization, then open its workspace.</p>
  {% for id, name in organizations.items() %}
    <form method="post" action="{{ url_for('sign_in') }}" style="margin-bottom: .6rem">
      <input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
      <input type="hidden" name="organization_id" value="{{ id }}">
      <button type="submit" id="sign-in-{{ id }}">{{ name }} (organization {{ id }})</button>
    </form>
  {% endfor %}
{% endblock %}"""

_WORKSPACE = """{% extends "billing_saas/base.html" %}
{% block title %}Workspace{% endblock %}
{% block content %}
  <h1 id="workspace">Workspace of {{ name }}</h1>
  <p>Unlocked: organization {{ organization_id }} holds the <code>saas</code> entitlement.</p>
  <form method="post" action="{{ url_for('sign_out') }}">
    <input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
    <button type="submit">Sign out</button>
  </form>
{% endblock %}"""


def signed_in_organization() -> int | None:
    """The host app's identity callable: here, whatever the demo's sign-in stored."""
    organization_id = session.get("organization_id")
    return int(organization_id) if organization_id is not None else None


def create_demo_app(settings: Settings | None = None, secret_key: str | None = None) -> Flask:
    settings = settings or Settings.from_env()
    # Before the dev server logs its first line: werkzeug gives its logger a handler of its own
    # when none is configured yet, and billing's, set up lazily at the first request, then
    # printed every request a second time.
    configure_logging(settings.log_level, settings.log_format)
    app = create_billing_app(settings)
    # A fresh key per process: demo sessions end when the app restarts, which is fine here.
    app.secret_key = secret_key or secrets.token_hex(32)
    # No app-wide CSRFProtect here: it would also refuse Stripe's webhook POSTs unless the
    # webhook view were exempted. The gate checks its own form; the demo's forms do the same.
    app.jinja_env.globals["csrf_token"] = generate_csrf
    SaasGate(app, current_organization=signed_in_organization, workspace_url="/workspace")

    @app.get("/")
    def index() -> ResponseReturnValue:
        return render_template_string(_SIGN_IN, organizations=DEMO_ORGANIZATIONS)

    @app.post("/sign-in")
    def sign_in() -> ResponseReturnValue:
        require_csrf()
        organization_id = request.form.get("organization_id", type=int)
        if organization_id not in DEMO_ORGANIZATIONS:
            abort(400)
        session["organization_id"] = organization_id
        return redirect(url_for("workspace"), 303)

    @app.post("/sign-out")
    def sign_out() -> ResponseReturnValue:
        require_csrf()
        session.clear()
        return redirect(url_for("index"), 303)

    @app.get("/workspace")
    @require_saas
    def workspace() -> ResponseReturnValue:
        organization_id = signed_in_organization()
        name = DEMO_ORGANIZATIONS.get(organization_id or 0, "?")
        return render_template_string(_WORKSPACE, name=name, organization_id=organization_id)

    @app.errorhandler(401)
    def not_signed_in(_error: Exception) -> ResponseReturnValue:
        return redirect(url_for("index"))

    return app
