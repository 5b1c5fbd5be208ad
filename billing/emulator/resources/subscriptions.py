"""Subscriptions, their items and the billing cycle.

Layout of API 2026-10-28 (the version stripe-python 16 pins): the billing period lives on each
item (`items.data[].current_period_start/end`), not on the subscription. At period end the
renewal invoice is drafted (see invoices.py) and the items roll to the next period at once, as
Stripe does, firing `customer.subscription.updated`.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from typing import Any

from billing.emulator.errors import invalid
from billing.emulator.params import (
    METADATA,
    Bool,
    Int,
    List,
    Obj,
    Str,
    endpoint,
    in_range,
    list_endpoint,
)
from billing.emulator.resources import entitlements, invoices
from billing.emulator.resources.core import merge_metadata
from billing.emulator.router import router
from billing.emulator.state import DAY, State, newest_first, paginate

STATUSES = (
    "active",
    "all",
    "canceled",
    "ended",
    "incomplete",
    "incomplete_expired",
    "past_due",
    "paused",
    "trialing",
    "unpaid",
)


def boundary(anchor: int, interval: str, count: int, n: int) -> int:
    """Start of the n-th period after `anchor`; months clamp to the month's last day."""
    if interval == "day":
        return anchor + n * count * DAY
    if interval == "week":
        return anchor + n * count * 7 * DAY
    months = n * count * (12 if interval == "year" else 1)
    dt = datetime.fromtimestamp(anchor, UTC)
    year, month0 = divmod(dt.month - 1 + months, 12)
    year += dt.year
    day = min(dt.day, calendar.monthrange(year, month0 + 1)[1])
    return int(dt.replace(year=year, month=month0 + 1, day=day).timestamp())


def period(st: State, sub: dict[str, Any], offset: int = 0) -> tuple[int, int]:
    anchor, n = st.sub_cycle[sub["id"]]
    recurring = sub["items"]["data"][0]["price"]["recurring"]
    interval, count = recurring["interval"], recurring["interval_count"]
    return (
        boundary(anchor, interval, count, n + offset),
        boundary(anchor, interval, count, n + offset + 1),
    )


def _check_prices(
    st: State, items: list[dict[str, Any]], param: str, existing: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    prices = []
    for i, item in enumerate(items):
        if not item.get("price"):
            raise invalid(
                f"Missing required param: {param}[{i}][price].",
                param=f"{param}[{i}][price]",
                code="parameter_missing",
            )
        price = st.get(st.prices, "price", item["price"], f"{param}[{i}][price]", status=400)
        if price["type"] != "recurring":
            raise invalid(
                "The price specified is set to `type=one_time` but this field only accepts "
                "prices with `type=recurring`.",
                param=f"{param}[{i}][price]",
            )
        if not price["active"]:
            raise invalid("The price specified is inactive.", param=f"{param}[{i}][price]")
        prices.append(price)
    reference = [x["price"] for x in existing or []] + prices
    first = reference[0] if reference else None
    for price in reference:
        assert first is not None
        same = (price["recurring"]["interval"], price["recurring"]["interval_count"]) == (
            first["recurring"]["interval"],
            first["recurring"]["interval_count"],
        )
        if not same:
            raise invalid(
                "Currency and interval fields must match across all plans on a subscription.",
                param=param,
            )
        if price["currency"] != first["currency"]:
            raise invalid(
                "Currency and interval fields must match across all plans on a subscription.",
                param=param,
            )
    return prices


def _new_item(
    st: State, sub_id: str, price: dict[str, Any], spec: dict[str, Any], start: int, end: int
) -> dict[str, Any]:
    item = {
        "id": st.new_id("si_"),
        "object": "subscription_item",
        "billing_thresholds": None,
        "created": st.now(),
        "current_period_end": end,
        "current_period_start": start,
        "discounts": [],
        "metadata": dict(spec.get("metadata") or {}),
        "price": price,  # shared: price updates show here too, as Stripe embeds the price
        "subscription": sub_id,
        "tax_rates": [],
    }
    if price["recurring"]["usage_type"] == "licensed":
        item["quantity"] = spec.get("quantity") or 1
    elif spec.get("quantity") is not None:
        raise invalid("Quantity is not allowed on metered prices.", param="items")
    st.subscription_items[item["id"]] = item
    return item


def create_subscription(st: State, p: dict[str, Any]) -> dict[str, Any]:
    """Shared by the API and checkout completion. The first invoice is paid at once."""
    customer = st.customer(p["customer"])
    items = p.get("items") or []
    if not items:
        raise invalid("Missing required param: items.", param="items", code="parameter_missing")
    prices = _check_prices(st, items, "items")
    now = st.now()
    anchor = p.get("billing_cycle_anchor") or now
    sub_id = st.new_id("sub_")
    st.sub_cycle[sub_id] = (anchor, 0)
    recurring = prices[0]["recurring"]
    if anchor > now:  # first, partial period runs from now to the anchor
        st.sub_cycle[sub_id] = (anchor, -1)
        start, end = now, anchor
    else:
        start = boundary(anchor, recurring["interval"], recurring["interval_count"], 0)
        end = boundary(anchor, recurring["interval"], recurring["interval_count"], 1)
    sub = {
        "id": sub_id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": anchor,
        "billing_cycle_anchor_config": None,
        "billing_thresholds": None,
        "cancel_at": None,
        "cancel_at_period_end": bool(p.get("cancel_at_period_end")),
        "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "collection_method": p.get("collection_method") or "charge_automatically",
        "created": now,
        "currency": prices[0]["currency"],
        "customer": customer["id"],
        "days_until_due": p.get("days_until_due"),
        "default_payment_method": p.get("default_payment_method"),
        "default_source": None,
        "default_tax_rates": [],
        "description": p.get("description"),
        "discounts": [],
        "ended_at": None,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": {
            "object": "list",
            "data": [],
            "has_more": False,
            "total_count": 0,
            "url": f"/v1/subscription_items?subscription={sub_id}",
        },
        "latest_invoice": None,
        "livemode": False,
        "metadata": dict(p.get("metadata") or {}),
        "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {
            "payment_method_options": None,
            "payment_method_types": None,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": None,
        "pending_setup_intent": None,
        "pending_update": None,
        "schedule": None,
        "start_date": now,
        "status": "active",
        "test_clock": None,
        "transfer_data": None,
        "trial_end": None,
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": None,
    }
    for spec, price in zip(items, prices, strict=True):
        sub["items"]["data"].append(_new_item(st, sub_id, price, spec, start, end))
    sub["items"]["total_count"] = len(items)
    st.subscriptions[sub_id] = sub
    st.emit("customer.subscription.created", sub)
    _first_invoice(st, sub, start, end)
    st.schedule_at(end, "period_end", sub_id)
    entitlements.sync(st, customer["id"])
    return sub


def _draft_invoice(
    st: State,
    sub: dict[str, Any],
    reason: str,
    covers: tuple[int, int],
    *,
    metered: tuple[int, int] | None,
    licensed: tuple[int, int] | None,
) -> dict[str, Any]:
    """A draft invoice for `sub` with a line per item: metered usage over `metered`, licensed
    quantities over `licensed` (None leaves that kind of item off the invoice)."""
    inv = invoices.new_invoice(
        st,
        sub["customer"],
        subscription=sub,
        billing_reason=reason,
        period=covers,
        currency=sub["currency"],
    )
    for item in sub["items"]["data"]:
        if item["price"]["recurring"]["usage_type"] == "metered":
            if metered is not None:
                invoices.add_metered_line(st, inv, item, metered)
        elif licensed is not None:
            invoices.price_line(st, inv, item, item["quantity"], licensed)
    return inv


def _first_invoice(st: State, sub: dict[str, Any], start: int, end: int) -> None:
    now = st.now()
    inv = _draft_invoice(
        st, sub, "subscription_create", (now, now), metered=(start, end), licensed=(start, end)
    )
    invoices.attach_pending_items(st, inv, sub["id"])
    invoices.refresh(st, inv)
    sub["latest_invoice"] = inv["id"]
    st.emit("invoice.created", inv)
    # The first invoice is charged at once, as with a working test card (Checkout already paid).
    invoices.finalize(st, inv)
    if inv["status"] == "open" and inv["collection_method"] == "charge_automatically":
        invoices.mark_paid(st, inv)


def run_period_end(st: State, sub_id: str, due: int) -> None:
    """Renewal at period end: draft the invoice for the closed period, then roll or cancel."""
    sub = st.subscriptions.get(sub_id)
    if sub is None or sub["status"] not in entitlements.LIVE_STATUSES:
        return
    start, end = period(st, sub)
    if end != due:
        return  # a stale entry: the period changed since it was scheduled
    ending = sub["cancel_at_period_end"] or (
        sub["cancel_at"] is not None and sub["cancel_at"] <= end
    )
    _, next_end = period(st, sub, 1)
    # Usage is billed in arrears; licensed items in advance for the next period, if there is one.
    inv = _draft_invoice(
        st,
        sub,
        "subscription_cycle",
        (start, end),
        metered=(start, end),
        licensed=None if ending else (end, next_end),
    )
    invoices.attach_pending_items(st, inv, sub_id)
    invoices.open_draft(st, inv)
    if ending:
        sub["latest_invoice"] = inv["id"]
        _end(st, sub, reason="cancellation_requested")
        return
    previous = {
        "items": {"data": [dict(item) for item in sub["items"]["data"]]},
        "latest_invoice": sub["latest_invoice"],
    }
    anchor, n = st.sub_cycle[sub_id]
    st.sub_cycle[sub_id] = (anchor, n + 1)
    for item in sub["items"]["data"]:
        item["current_period_start"], item["current_period_end"] = end, next_end
    sub["latest_invoice"] = inv["id"]
    st.emit("customer.subscription.updated", sub, previous)
    st.schedule_at(next_end, "period_end", sub_id)


def _end(
    st: State, sub: dict[str, Any], reason: str, details: dict[str, Any] | None = None
) -> None:
    now = st.now()
    sub["status"] = "canceled"
    sub["canceled_at"] = sub["canceled_at"] or now
    sub["ended_at"] = now
    sub["cancellation_details"] = {
        "comment": None,
        "feedback": None,
        **(details or {}),
        "reason": reason,
    }
    st.emit("customer.subscription.deleted", sub)
    entitlements.sync(st, sub["customer"])


# API --------------------------------------------------------------------------------------------

_ITEM = Obj({"metadata": METADATA, "price": Str(), "quantity": Int(0)})
_COMMON = {
    "cancel_at": Int(),
    "cancel_at_period_end": Bool(),
    "collection_method": Str(choices=("charge_automatically", "send_invoice")),
    "days_until_due": Int(0),
    "default_payment_method": Str(),
    "description": Str(500),
    "metadata": METADATA,
    "off_session": Bool(),
    "payment_behavior": Str(
        choices=(
            "allow_incomplete",
            "default_incomplete",
            "error_if_incomplete",
            "pending_if_incomplete",
        )
    ),
    "proration_behavior": Str(choices=("always_invoice", "create_prorations", "none")),
}


@router.route(
    "POST",
    "/v1/subscriptions",
    endpoint(
        {
            **_COMMON,
            "billing_cycle_anchor": Int(),
            "currency": Str(3),
            "customer": Str(),
            "items": List(_ITEM, 20),
        },
        ("customer",),
    ),
)
def subscriptions_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    if p.get("billing_cycle_anchor") is not None and p["billing_cycle_anchor"] < st.now():
        raise invalid("billing_cycle_anchor cannot be in the past.", param="billing_cycle_anchor")
    sub = create_subscription(st, p)
    if p.get("cancel_at") is not None:
        sub["cancel_at"] = p["cancel_at"]
    return sub


@router.route("GET", "/v1/subscriptions/{id}", endpoint({}))
def subscriptions_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return st.get(st.subscriptions, "subscription", ident)


@router.route(
    "POST",
    "/v1/subscriptions/{id}",
    endpoint(
        {
            **_COMMON,
            "items": List(
                Obj(
                    {
                        "clear_usage": Bool(),
                        "deleted": Bool(),
                        "id": Str(),
                        "metadata": METADATA,
                        "price": Str(),
                        "quantity": Int(0),
                    }
                ),
                20,
            ),
        }
    ),
)
def subscriptions_update(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    sub = st.get(st.subscriptions, "subscription", ident)
    if sub["status"] == "canceled":
        raise invalid(
            "A canceled subscription can only update its cancellation_details and metadata.",
            param="id",
        )
    previous: dict[str, Any] = {}
    for key in (
        "cancel_at",
        "cancel_at_period_end",
        "collection_method",
        "days_until_due",
        "default_payment_method",
        "description",
    ):
        if key in p and sub.get(key) != p[key]:
            previous[key] = sub.get(key)
            sub[key] = p[key]
    if "metadata" in p:
        previous["metadata"] = dict(sub["metadata"])
        merge_metadata(sub, p["metadata"])
    if p.get("items"):
        previous["items"] = {"data": [dict(i) for i in sub["items"]["data"]]}
        _update_items(st, sub, p["items"])
    if sub["cancel_at_period_end"]:
        sub["cancel_at"] = period(st, sub)[1]
    elif "cancel_at_period_end" in previous:
        sub["cancel_at"] = None
    if previous:
        st.emit("customer.subscription.updated", sub, previous)
    entitlements.sync(st, sub["customer"])
    return sub


def _update_items(st: State, sub: dict[str, Any], changes: list[dict[str, Any]]) -> None:
    items = sub["items"]["data"]
    start, end = period(st, sub)
    by_id = {item["id"]: item for item in items}
    keep = list(items)
    added_specs = []
    for i, change in enumerate(changes):
        if change.get("id"):
            item = by_id.get(change["id"])
            if item is None:
                raise invalid(
                    f"No such subscription item: '{change['id']}'",
                    param=f"items[{i}][id]",
                    code="resource_missing",
                )
            if change.get("deleted"):
                keep.remove(item)
                continue
            if change.get("price"):
                (price,) = _check_prices(st, [change], "items", [x for x in keep if x is not item])
                item["price"] = price
            if change.get("quantity") is not None and "quantity" in item:
                item["quantity"] = change["quantity"]
            if change.get("metadata") is not None:
                merge_metadata(item, change["metadata"])
        else:
            added_specs.append(change)
    prices = _check_prices(st, added_specs, "items", keep) if added_specs else []
    for spec, price in zip(added_specs, prices, strict=True):
        keep.append(_new_item(st, sub["id"], price, spec, start, end))
    if not keep:
        raise invalid("A subscription must have at least one item.", param="items")
    sub["items"]["data"] = keep
    sub["items"]["total_count"] = len(keep)


@router.route(
    "DELETE",
    "/v1/subscriptions/{id}",
    endpoint(
        {
            "cancellation_details": Obj({"comment": Str(), "feedback": Str()}),
            "invoice_now": Bool(),
            "prorate": Bool(),
        }
    ),
)
def subscriptions_cancel(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    sub = st.get(st.subscriptions, "subscription", ident)
    if sub["status"] == "canceled":
        raise invalid(
            f"A canceled subscription can't be canceled again: {ident}.", code="resource_missing"
        )
    if p.get("invoice_now"):  # bill the usage so far
        start, _ = period(st, sub)
        now = st.now()
        inv = _draft_invoice(
            st, sub, "subscription_update", (start, now), metered=(start, now), licensed=None
        )
        invoices.attach_pending_items(st, inv, ident)
        invoices.refresh(st, inv)
        sub["latest_invoice"] = inv["id"]
        st.emit("invoice.created", inv)
        invoices.finalize(st, inv)
    _end(st, sub, reason="cancellation_requested", details=p.get("cancellation_details"))
    return sub


@router.route(
    "GET",
    "/v1/subscriptions",
    list_endpoint({"customer": Str(), "price": Str(), "status": Str(choices=STATUSES)}),
)
def subscriptions_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    status = p.get("status")

    def keep(sub: dict[str, Any]) -> bool:
        if status == "ended":
            ok = sub["status"] in ("canceled", "incomplete_expired")
        elif status in (None, ""):
            ok = sub["status"] != "canceled"
        else:
            ok = status == "all" or sub["status"] == status
        return (
            ok
            and in_range(sub["created"], p.get("created"))
            and (not p.get("customer") or sub["customer"] == p["customer"])
            and (
                not p.get("price")
                or any(i["price"]["id"] == p["price"] for i in sub["items"]["data"])
            )
        )

    found = [s for s in st.subscriptions.values() if keep(s)]
    return paginate(newest_first(found), p, "/v1/subscriptions")


@router.route("GET", "/v1/subscription_items/{id}", endpoint({}))
def subscription_items_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return st.get(st.subscription_items, "subscription_item", ident)


@router.route(
    "GET", "/v1/subscription_items", list_endpoint({"subscription": Str()}, ("subscription",))
)
def subscription_items_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    sub = st.get(st.subscriptions, "subscription", p["subscription"], "subscription", 400)
    return paginate(
        list(sub["items"]["data"]), p, f"/v1/subscription_items?subscription={sub['id']}"
    )


def run_due_work(st: State, kind: str, ident: str, due: int) -> None:
    """The scheduler's dispatcher (see State.run_due)."""
    if kind == "period_end":
        run_period_end(st, ident, due)
    elif kind == "finalize":
        invoices.run_finalize(st, ident)
