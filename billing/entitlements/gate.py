"""The `saas` workspace gate for a host Flask app, and the self-service upgrade behind it.

    Billing(app)  # first: the gate reads billing's runtime
    gate = SaasGate(app, current_organization=lambda: current_user.organization_id)

    @app.get("/workspace")
    @require_saas
    def workspace(): ...

    gate.protect(workspace_blueprint)          # or guard every route of a blueprint

An entitled organization goes through. Any other is sent, in booking mode (no
`STRIPE_SAAS_PRICE_ID`), to `SAAS_WORKSPACE_BOOKING_URL`; in upgrade mode, to a page that starts a
Stripe Checkout Session. Nothing the browser sends decides access: the organization comes from the
host's callable, and the unlock is the `saas` entitlement that the webhook flow stores once Stripe
reports the subscription. The check reads the local table once per request and never calls Stripe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError, generate_csrf, validate_csrf
from wtforms import ValidationError

from billing import logs
from billing.entitlements import SAAS_FEATURE
from billing.entitlements.checkout import start_upgrade_checkout
from billing.entitlements.service import has_entitlement
from billing.runtime import EXTENSION_KEY, current_runtime
from billing.stripe_gateway import StripeGatewayError

log = logs.get_logger("billing.entitlements")

GATE_KEY = "billing_saas_gate"
BLUEPRINT_NAME = "billing_saas"
OrganizationLoader = Callable[[], int | None]
View = TypeVar("View", bound=Callable[..., Any])

blueprint = Blueprint(BLUEPRINT_NAME, __name__, template_folder="templates")


class SaasGate:
    """Flask extension: the upgrade pages under `url_prefix` and the guard for workspace routes.

    `current_organization` returns the signed-in user's organization id (None: not signed in, 401).
    `workspace_url` is where the upgrade flow ends when it was not entered from a gated page.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        current_organization: OrganizationLoader | None = None,
        workspace_url: str = "/",
        url_prefix: str = "/billing/saas",
    ) -> None:
        self.current_organization = current_organization
        self.workspace_url = workspace_url
        self.url_prefix = url_prefix
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if self.current_organization is None:
            raise TypeError("SaasGate needs current_organization: a callable giving the org id")
        if EXTENSION_KEY not in app.extensions:
            # The gate reads billing's runtime; the host adopts billing itself (entitlements sit
            # below the Flask extension that wires every feature).
            raise RuntimeError(
                "SaasGate needs billing on the app first: Billing(app), then the gate"
            )
        app.extensions[GATE_KEY] = self
        app.register_blueprint(blueprint, url_prefix=self.url_prefix)

    def protect(self, protected: Blueprint) -> Blueprint:
        """Guard every route of `protected` (call before the app registers it)."""
        protected.before_request(guard_request)
        return protected


def require_saas(view: View) -> View:
    """Decorator: the view runs only for an organization holding the `saas` entitlement."""

    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        refused = guard_request()
        return refused if refused is not None else view(*args, **kwargs)

    return guarded  # type: ignore[return-value]


def guard_request() -> Response | None:
    """None when the current organization may use the workspace, else the gated response."""
    organization_id = current_organization_id()
    if organization_entitled(organization_id):
        return None
    # script_root: an app mounted under a prefix must come back to the prefixed path.
    return gated_response((request.script_root + request.full_path).rstrip("?"))


def _gate() -> SaasGate:
    gate = current_app.extensions.get(GATE_KEY)
    if gate is None:
        raise RuntimeError("the saas gate is not set up: SaasGate(app, current_organization=…)")
    return gate


def current_organization_id() -> int:
    """The organization of the signed-in user, from the host app only (never from the request)."""
    organization_id = _gate().current_organization()  # type: ignore[misc]
    if organization_id is None:
        abort(401)
    return int(organization_id)


def organization_entitled(organization_id: int) -> bool:
    """`has_entitlement(…, "saas")`, asked at most once per request."""
    answers: dict[int, bool] = g.setdefault("billing_saas_entitled", {})
    if organization_id not in answers:
        answers[organization_id] = has_entitlement(current_runtime(), organization_id, SAAS_FEATURE)
    return answers[organization_id]


def gated_response(next_path: str) -> Response:
    settings = current_runtime().settings
    booking = settings.saas_gate_mode == "booking"
    target = (
        settings.saas_workspace_booking_url
        if booking
        else url_for(f"{BLUEPRINT_NAME}.upgrade", next=safe_next(next_path))
    )
    if request.method not in ("GET", "HEAD") or _prefers_json():
        # An API call or a form post gets an answer it can show, not a redirect to a page.
        response = jsonify(
            error="saas_entitlement_required", mode=settings.saas_gate_mode, url=target
        )
        response.status_code = 403
        return response
    return redirect(target)


def _prefers_json() -> bool:
    # `*/*` (browsers, curl) matches text/html first; only an explicit JSON client gets JSON.
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def safe_next(value: str | None) -> str:
    """A path on this site to continue to; anything else (another host, a scheme) is dropped."""
    default = _gate().workspace_url
    if not value or not value.startswith("/") or value.startswith("//"):
        return default
    if "\\" in value or any(ord(char) < 32 for char in value):
        return default
    parts = urlsplit(value)
    return default if parts.scheme or parts.netloc else value


def require_csrf() -> None:
    """Refuse (400) a form post without the token of this user's session (Flask-WTF's check)."""
    try:
        validate_csrf(request.form.get("csrf_token"))
    except ValidationError as error:
        raise CSRFError(str(error)) from error


def _external_url(endpoint: str, **values: Any) -> str:
    """An absolute URL for Stripe to send the browser back to."""
    base = current_runtime().settings.saas_public_base_url
    if base:
        return base + url_for(endpoint, **values)
    return url_for(endpoint, _external=True, **values)


# Views ----------------------------------------------------------------------------------------


@blueprint.get("/upgrade")
def upgrade() -> ResponseReturnValue:
    organization_id = current_organization_id()
    next_path = safe_next(request.args.get("next"))
    if organization_entitled(organization_id):
        return redirect(next_path)
    settings = current_runtime().settings
    if settings.saas_gate_mode == "booking":
        return redirect(settings.saas_workspace_booking_url)
    return _upgrade_page(next_path, canceled=request.args.get("canceled") == "1")


def _upgrade_page(
    next_path: str, *, canceled: bool = False, error: str | None = None, status: int = 200
) -> ResponseReturnValue:
    page = render_template(
        "billing_saas/upgrade.html",
        next_path=next_path,
        csrf_token=generate_csrf(),
        canceled=canceled,
        error=error,
    )
    return page, status


@blueprint.post("/checkout")
def checkout() -> ResponseReturnValue:
    try:
        require_csrf()
    except CSRFError:
        # Most often a page left open past the token's lifetime: say so, with a fresh form.
        message = "This page expired before you clicked. Please click Upgrade again."
        return _upgrade_page(safe_next(request.form.get("next")), error=message, status=400)
    # The organization comes from the host's sign-in; an `organization_id` in the form is ignored.
    organization_id = current_organization_id()
    next_path = safe_next(request.form.get("next"))
    if organization_entitled(organization_id):
        return redirect(next_path, 303)
    runtime = current_runtime()
    if runtime.settings.saas_gate_mode == "booking":
        return redirect(runtime.settings.saas_workspace_booking_url, 303)
    try:
        url = start_upgrade_checkout(
            runtime,
            organization_id,
            success_url=_external_url(f"{BLUEPRINT_NAME}.checkout_success", next=next_path),
            cancel_url=_external_url(f"{BLUEPRINT_NAME}.checkout_canceled", next=next_path),
        )
    except StripeGatewayError as error:
        log.warning(
            "SaaS upgrade checkout could not be created",
            extra={"organization_id": organization_id, "error": str(error)},
        )
        message = "Stripe could not start the checkout just now. Please try again in a minute."
        return _upgrade_page(next_path, error=message, status=503)
    return redirect(url, 303)


@blueprint.get("/checkout/success")
def checkout_success() -> ResponseReturnValue:
    """Waits for the entitlement; whatever Stripe appended to the URL is not looked at."""
    organization_id = current_organization_id()
    next_path = safe_next(request.args.get("next"))
    if organization_entitled(organization_id):
        return redirect(next_path)
    return render_template(
        "billing_saas/waiting.html",
        next_path=next_path,
        status_url=url_for(f"{BLUEPRINT_NAME}.status"),
        wait_seconds=current_runtime().settings.saas_unlock_wait_seconds,
    )


@blueprint.get("/checkout/cancel")
def checkout_canceled() -> ResponseReturnValue:
    return redirect(
        url_for(f"{BLUEPRINT_NAME}.upgrade", next=safe_next(request.args.get("next")), canceled=1)
    )


@blueprint.get("/status")
def status() -> ResponseReturnValue:
    """What the waiting page polls: the current organization's `saas` entitlement, uncached."""
    response = jsonify(entitled=organization_entitled(current_organization_id()))
    response.headers["Cache-Control"] = "no-store"
    return response
