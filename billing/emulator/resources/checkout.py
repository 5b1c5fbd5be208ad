"""Checkout Sessions (mode `subscription`) and their completion, which only a test control (or
the emulator's own payment page) can trigger, as if the customer had paid."""

from __future__ import annotations

from typing import Any

from billing.emulator.errors import invalid
from billing.emulator.params import METADATA, Bool, Int, List, Obj, Str, endpoint, list_endpoint
from billing.emulator.resources import subscriptions
from billing.emulator.resources.core import create_customer
from billing.emulator.router import router
from billing.emulator.state import DAY, State, expand, newest_first, paginate

_LINE = Obj({"price": Str(), "quantity": Int(1)}, ("price",))


@router.route(
    "POST",
    "/v1/checkout/sessions",
    endpoint(
        {
            "allow_promotion_codes": Bool(),
            "automatic_tax": Obj({"enabled": Bool()}),
            "billing_address_collection": Str(choices=("auto", "required")),
            "cancel_url": Str(5000),
            "client_reference_id": Str(200),
            "customer": Str(),
            "customer_email": Str(512),
            "customer_update": Obj({k: Str() for k in ("address", "name", "shipping")}),
            "expires_at": Int(),
            "line_items": List(_LINE, 20),
            "locale": Str(),
            "metadata": METADATA,
            "mode": Str(choices=("payment", "setup", "subscription")),
            "payment_method_types": List(Str()),
            "return_url": Str(5000),
            "subscription_data": Obj({"description": Str(500), "metadata": METADATA}),
            "success_url": Str(5000),
            "tax_id_collection": Obj({"enabled": Bool()}),
            "ui_mode": Str(choices=("embedded", "hosted")),
        },
        ("mode",),
    ),
)
def sessions_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    if p["mode"] != "subscription":
        raise invalid("The emulator supports Checkout in `mode=subscription` only.", param="mode")
    if p.get("customer") and p.get("customer_email"):
        raise invalid(
            "You may only specify one of these parameters: customer, customer_email.",
            param="customer_email",
        )
    if p.get("customer"):
        st.customer(p["customer"])
    lines = p.get("line_items") or []
    if not lines:
        raise invalid(
            "`line_items` is required in `subscription` mode.",
            param="line_items",
            code="parameter_missing",
        )
    prices = subscriptions._check_prices(st, lines, "line_items")
    for i, (line, price) in enumerate(zip(lines, prices, strict=True)):
        if price["recurring"]["usage_type"] == "metered" and line.get("quantity") is not None:
            raise invalid(
                "Quantity should not be specified for metered prices.",
                param=f"line_items[{i}][quantity]",
            )
    ui_mode = p.get("ui_mode") or "hosted"
    if ui_mode == "hosted" and not p.get("success_url"):
        raise invalid(
            "Missing required param: success_url.", param="success_url", code="parameter_missing"
        )
    now = st.now()
    sess_id = st.new_id("cs_test_", 58)
    amount = sum(
        int(price["unit_amount"] or 0) * (line.get("quantity") or 1)
        for line, price in zip(lines, prices, strict=True)
        if price["recurring"]["usage_type"] == "licensed"
    )
    sess = {
        "id": sess_id,
        "object": "checkout.session",
        "allow_promotion_codes": p.get("allow_promotion_codes"),
        "amount_subtotal": amount,
        "amount_total": amount,
        "billing_address_collection": p.get("billing_address_collection"),
        "cancel_url": p.get("cancel_url"),
        "client_reference_id": p.get("client_reference_id"),
        "created": now,
        "currency": prices[0]["currency"],
        "customer": p.get("customer"),
        "customer_creation": None if p.get("customer") else "always",
        "customer_details": None,
        "customer_email": p.get("customer_email"),
        "expires_at": p.get("expires_at") or now + DAY,
        "invoice": None,
        "livemode": False,
        "locale": p.get("locale"),
        "metadata": dict(p.get("metadata") or {}),
        "mode": "subscription",
        "payment_intent": None,
        "payment_status": "unpaid",
        "return_url": p.get("return_url"),
        "status": "open",
        "subscription": None,
        "success_url": p.get("success_url"),
        "ui_mode": ui_mode,
        "url": f"{st.request.base_url or st.base_url}/_emulator/checkout/{sess_id}"
        if ui_mode == "hosted"
        else None,
    }
    st.checkout_sessions[sess_id] = sess
    st.checkout_lines[sess_id] = [
        {
            "id": st.new_id("li_", 24),
            "object": "item",
            "amount_subtotal": int(price["unit_amount"] or 0) * (line.get("quantity") or 1),
            "amount_total": int(price["unit_amount"] or 0) * (line.get("quantity") or 1),
            "currency": price["currency"],
            "description": st.products.get(price["product"], {}).get("name"),
            "price": price,
            "quantity": line.get("quantity")
            if line.get("quantity") is not None
            else (None if price["recurring"]["usage_type"] == "metered" else 1),
        }
        for line, price in zip(lines, prices, strict=True)
    ]
    st.checkout_sessions[sess_id]["_subscription_data"] = p.get("subscription_data") or {}
    return public(st, sess)


def public(st: State, sess: dict[str, Any], expand_paths: list[str] | None = None) -> Any:
    out = {k: v for k, v in sess.items() if not k.startswith("_")}
    paths = [x for x in expand_paths or [] if x != "line_items"]
    if expand_paths and "line_items" in expand_paths:
        out["line_items"] = {
            "object": "list",
            "data": st.checkout_lines[sess["id"]],
            "has_more": False,
            "url": f"/v1/checkout/sessions/{sess['id']}/line_items",
        }
    return expand(st, out, paths) if paths else out


@router.route("GET", "/v1/checkout/sessions/{id}", endpoint({}))
def sessions_retrieve(st: State, p: dict[str, Any], ident: str) -> Any:
    sess = st.get(st.checkout_sessions, "checkout.session", ident)
    return public(st, sess, p.pop("expand", None))


@router.route("GET", "/v1/checkout/sessions/{id}/line_items", list_endpoint())
def sessions_line_items(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    st.get(st.checkout_sessions, "checkout.session", ident)
    return paginate(st.checkout_lines[ident], p, f"/v1/checkout/sessions/{ident}/line_items")


@router.route(
    "GET",
    "/v1/checkout/sessions",
    list_endpoint(
        {
            "customer": Str(),
            "status": Str(choices=("complete", "expired", "open")),
            "subscription": Str(),
            "payment_intent": Str(),
        }
    ),
)
def sessions_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    found = [
        public(st, s)
        for s in st.checkout_sessions.values()
        if all(not p.get(k) or s.get(k) == p[k] for k in ("customer", "status", "subscription"))
    ]
    return paginate(newest_first(found), p, "/v1/checkout/sessions")


@router.route("POST", "/v1/checkout/sessions/{id}/expire", endpoint({}))
def sessions_expire(st: State, p: dict[str, Any], ident: str) -> Any:
    sess = st.get(st.checkout_sessions, "checkout.session", ident)
    if sess["status"] != "open":
        raise invalid(
            f"Only open Checkout Sessions can be expired; this one is {sess['status']}.",
            param="session",
        )
    sess["status"] = "expired"
    sess["url"] = None
    st.emit("checkout.session.expired", public(st, sess))
    return public(st, sess)


def complete(st: State, ident: str, email: str | None = None, name: str | None = None) -> Any:
    """As if the customer paid: customer (if new), subscription, then the session event."""
    sess = st.get(st.checkout_sessions, "checkout.session", ident)
    if sess["status"] != "open":
        raise invalid(f"Checkout Session {ident} is {sess['status']}, not open.", param="id")
    email = email or sess["customer_email"] or f"{ident[-8:].lower()}@example.com"
    if sess["customer"]:
        cus = st.customer(sess["customer"])
    else:
        cus = create_customer(st, {"email": email, "name": name})
    data = sess["_subscription_data"]
    sub = subscriptions.create_subscription(
        st,
        {
            "customer": cus["id"],
            "items": [
                {"price": li["price"]["id"], "quantity": li["quantity"]}
                for li in st.checkout_lines[ident]
            ],
            "metadata": data.get("metadata") or {},
            "description": data.get("description"),
        },
    )
    sess.update(
        {
            "customer": cus["id"],
            "customer_details": {
                "address": None,
                "email": cus.get("email") or email,
                "name": cus.get("name") or name,
                "phone": None,
                "tax_exempt": "none",
                "tax_ids": [],
            },
            "invoice": sub["latest_invoice"],
            "payment_status": "paid",
            "status": "complete",
            "subscription": sub["id"],
            "url": None,
        }
    )
    st.emit("checkout.session.completed", public(st, sess))
    return public(st, sess)
