"""Invoices and invoice items.

A subscription's renewal invoice is created as a draft at period end (`invoice.created`) with the
metered usage of the closed period; it is finalized `finalize_delay` seconds later, when its metered
lines are recomputed, so usage reported late for the closed period still lands on it (Stripe's
grace period). Then, unless auto-pay is off, it is paid at once as with a working test card.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from billing.emulator.errors import invalid
from billing.emulator.params import METADATA, Bool, Int, Obj, Str, endpoint, list_endpoint
from billing.emulator.resources.core import merge_metadata
from billing.emulator.resources.metering import aggregate
from billing.emulator.router import router
from billing.emulator.state import State, newest_first, paginate


def new_invoice(
    st: State,
    customer: str,
    *,
    subscription: dict[str, Any] | None,
    billing_reason: str,
    period: tuple[int, int],
    currency: str,
) -> dict[str, Any]:
    now = st.now()
    cus = st.customers[customer]
    inv_id = st.new_id("in_", 24)
    sub_meta = dict(subscription["metadata"]) if subscription else None
    inv = {
        "id": inv_id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "Stripe emulator",
        "amount_due": 0,
        "amount_overpaid": 0,
        "amount_paid": 0,
        "amount_remaining": 0,
        "amount_shipping": 0,
        "attempt_count": 0,
        "attempted": False,
        "auto_advance": True,
        "automatic_tax": {
            "disabled_reason": None,
            "enabled": False,
            "liability": None,
            "status": None,
        },
        "automatically_finalizes_at": None,
        "billing_reason": billing_reason,
        "collection_method": (subscription or {}).get("collection_method", "charge_automatically"),
        "created": now,
        "currency": currency,
        "customer": customer,
        "customer_email": cus.get("email"),
        "customer_name": cus.get("name"),
        "default_payment_method": None,
        "description": None,
        "discounts": [],
        "due_date": None,
        "effective_at": None,
        "ending_balance": None,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "lines": {
            "object": "list",
            "data": [],
            "has_more": False,
            "total_count": 0,
            "url": f"/v1/invoices/{inv_id}/lines",
        },
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None,
        "number": None,
        "parent": (
            {
                "quote_details": None,
                "subscription_details": {
                    "metadata": sub_meta,
                    "subscription": subscription["id"],
                },
                "type": "subscription_details",
            }
            if subscription
            else None
        ),
        "period_end": period[1],
        "period_start": period[0],
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": "draft",
        "status_transitions": {
            "finalized_at": None,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        },
        "subtotal": 0,
        "subtotal_excluding_tax": 0,
        "total": 0,
        "total_discount_amounts": [],
        "total_excluding_tax": 0,
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
        "webhooks_delivered_at": None,
    }
    st.invoices[inv_id] = inv
    return inv


def _amount(quantity: int | float, unit_decimal: str | None) -> int:
    unit = Decimal(unit_decimal or "0")
    return int((Decimal(str(quantity)) * unit).to_integral_value(ROUND_HALF_UP))


def price_line(
    st: State,
    inv: dict[str, Any],
    item: dict[str, Any],
    quantity: int,
    period: tuple[int, int],
) -> dict[str, Any]:
    price = item["price"]
    product = st.products.get(price["product"], {})
    line = {
        "id": st.new_id("il_", 24),
        "object": "line_item",
        "amount": _amount(quantity, price["unit_amount_decimal"]),
        "currency": price["currency"],
        "description": f"{quantity} x {product.get('name', price['product'])}",
        "discount_amounts": [],
        "discountable": True,
        "discounts": [],
        "invoice": inv["id"],
        "livemode": False,
        "metadata": {},
        "parent": {
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None,
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": item["subscription"],
                "subscription_item": item["id"],
            },
            "type": "subscription_item_details",
        },
        "period": {"end": period[1], "start": period[0]},
        "pretax_credit_amounts": [],
        "pricing": {
            "price_details": {"price": price["id"], "product": price["product"]},
            "type": "price_details",
            "unit_amount_decimal": price["unit_amount_decimal"],
        },
        "quantity": quantity,
        "subtotal": 0,
        "taxes": [],
    }
    line["subtotal"] = line["amount"]
    inv["lines"]["data"].append(line)
    return line


def add_metered_line(
    st: State, inv: dict[str, Any], item: dict[str, Any], period: tuple[int, int]
) -> None:
    line = price_line(st, inv, item, 0, period)
    st.metered_lines[line["id"]] = (item["price"]["recurring"]["meter"], inv["customer"])
    _refresh_metered(st, line)


def _refresh_metered(st: State, line: dict[str, Any]) -> None:
    meter_id, customer = st.metered_lines[line["id"]]
    meter = st.meters.get(meter_id)
    qty = 0
    if meter is not None:
        # "If the overall cycle usage is negative, Stripe reports the invoice line item usage
        # quantity as 0."
        qty = max(
            0, int(aggregate(st, meter, customer, line["period"]["start"], line["period"]["end"]))
        )
    line["quantity"] = qty
    line["amount"] = line["subtotal"] = _amount(qty, line["pricing"]["unit_amount_decimal"])
    name = line["description"].split(" x ", 1)[-1]
    line["description"] = f"{qty} x {name}"


def refresh(st: State, inv: dict[str, Any]) -> dict[str, Any]:
    """A draft's metered lines follow the usage reported so far; totals follow the lines."""
    if inv["status"] == "draft":
        for line in inv["lines"]["data"]:
            if line["id"] in st.metered_lines:
                _refresh_metered(st, line)
    total = sum(line["amount"] for line in inv["lines"]["data"])
    inv["subtotal"] = inv["subtotal_excluding_tax"] = total
    inv["total"] = inv["total_excluding_tax"] = total
    inv["lines"]["total_count"] = len(inv["lines"]["data"])
    if inv["status"] in ("draft", "open"):
        inv["amount_due"] = total
        inv["amount_remaining"] = total - inv["amount_paid"]
    return inv


def attach_pending_items(st: State, inv: dict[str, Any], subscription: str | None) -> None:
    for ii in st.invoice_items.values():
        if (
            ii["invoice"] is None
            and ii["customer"] == inv["customer"]
            and ii["currency"] == inv["currency"]
            and (ii["_subscription"] in (None, subscription))
        ):
            _link_item(st, inv, ii)


def open_draft(st: State, inv: dict[str, Any]) -> None:
    """Announce a new draft and schedule its automatic finalization (if it auto-advances)."""
    refresh(st, inv)
    due = inv["created"] + st.settings.finalize_delay
    inv["automatically_finalizes_at"] = due if inv["auto_advance"] else None
    st.schedule_at(due, "finalize", inv["id"])
    st.emit("invoice.created", inv)


def finalize(st: State, inv: dict[str, Any]) -> dict[str, Any]:
    if inv["status"] != "draft":
        raise invalid(
            f"This invoice is already {inv['status']}.",
            param="invoice",
            code="invoice_not_editable",
        )
    refresh(st, inv)
    now = st.now()
    cus = st.customers[inv["customer"]]
    seq = st.invoice_seq.get(inv["customer"], 1)
    st.invoice_seq[inv["customer"]] = seq + 1
    inv["number"] = f"{cus.get('invoice_prefix', 'EMU')}-{seq:04d}"
    inv["status"] = "open"
    inv["automatically_finalizes_at"] = None
    inv["effective_at"] = now
    inv["status_transitions"]["finalized_at"] = now
    inv["hosted_invoice_url"] = f"{st.base_url}/_emulator/invoices/{inv['id']}"
    inv["webhooks_delivered_at"] = now
    if inv["collection_method"] == "send_invoice":
        inv["due_date"] = now + 30 * 86_400
    st.emit("invoice.finalized", inv)
    auto_pay = inv["collection_method"] == "charge_automatically" and (
        st.settings.invoice_auto_pay or inv["amount_due"] == 0
    )
    if auto_pay:
        mark_paid(st, inv)
    return inv


def mark_paid(st: State, inv: dict[str, Any]) -> None:
    now = st.now()
    inv["status"] = "paid"
    inv["attempted"] = inv["amount_due"] > 0
    inv["attempt_count"] = 1 if inv["attempted"] else 0
    inv["amount_paid"] = inv["amount_due"]
    inv["amount_remaining"] = 0
    inv["ending_balance"] = 0
    inv["status_transitions"]["paid_at"] = now
    st.emit("invoice.paid", inv)
    st.emit("invoice.payment_succeeded", inv)


def run_finalize(st: State, ident: str) -> None:
    inv = st.invoices.get(ident)
    if inv is not None and inv["status"] == "draft" and inv["auto_advance"]:
        finalize(st, inv)


# invoice API ------------------------------------------------------------------------------------


@router.route(
    "POST",
    "/v1/invoices",
    endpoint(
        {
            "auto_advance": Bool(),
            "collection_method": Str(choices=("charge_automatically", "send_invoice")),
            "currency": Str(3),
            "customer": Str(),
            "days_until_due": Int(0),
            "description": Str(),
            "metadata": METADATA,
            "pending_invoice_items_behavior": Str(choices=("exclude", "include")),
        },
        ("customer",),
    ),
)
def invoices_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    """A one-off draft (`billing_reason` manual). As on Stripe since API 2018-11-08 it does not
    auto-advance unless asked; pending invoice items stay pending unless `include`."""
    cus = st.customer(p["customer"])
    now = st.now()
    currency = (p.get("currency") or cus.get("currency") or "usd").lower()
    inv = new_invoice(
        st,
        cus["id"],
        subscription=None,
        billing_reason="manual",
        period=(now, now),
        currency=currency,
    )
    inv["auto_advance"] = bool(p.get("auto_advance"))
    inv["collection_method"] = p.get("collection_method") or "charge_automatically"
    inv["description"] = p.get("description")
    merge_metadata(inv, p.get("metadata"))
    if inv["collection_method"] == "send_invoice":
        inv["due_date"] = now + 86_400 * (p.get("days_until_due") or 30)
    if p.get("pending_invoice_items_behavior") == "include":
        attach_pending_items(st, inv, None)
    open_draft(st, inv)
    return inv


@router.route("DELETE", "/v1/invoices/{id}", endpoint({}))
def invoices_delete(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    """Only a one-off draft can be deleted; finalized or subscription invoices must be voided.
    Its invoice items go with it [?]; a later retrieve is a 404 `No such invoice`."""
    inv = st.get(st.invoices, "invoice", ident)
    if inv["status"] != "draft":
        raise invalid(
            f"You can only delete draft invoices; this invoice is {inv['status']}. "
            "Void it instead.",
            code="invoice_not_editable",
        )
    if inv["parent"] is not None:
        raise invalid(
            "Invoices created by a subscription cannot be deleted. Void the invoice instead.",
            code="invoice_not_editable",
        )
    del st.invoices[ident]
    for line in inv["lines"]["data"]:
        st.metered_lines.pop(line["id"], None)
        item = (line["parent"].get("invoice_item_details") or {}).get("invoice_item")
        st.invoice_items.pop(item or "", None)
    st.emit("invoice.deleted", inv)
    return {"id": ident, "object": "invoice", "deleted": True}


@router.route("GET", "/v1/invoices/{id}", endpoint({}))
def invoices_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return refresh(st, st.get(st.invoices, "invoice", ident))


@router.route(
    "GET",
    "/v1/invoices",
    list_endpoint(
        {
            "collection_method": Str(choices=("charge_automatically", "send_invoice")),
            "customer": Str(),
            "status": Str(choices=("draft", "open", "paid", "uncollectible", "void")),
            "subscription": Str(),
        }
    ),
)
def invoices_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    def keep(inv: dict[str, Any]) -> bool:
        parent = (inv.get("parent") or {}).get("subscription_details") or {}
        return (
            (not p.get("customer") or inv["customer"] == p["customer"])
            and (not p.get("status") or inv["status"] == p["status"])
            and (not p.get("subscription") or parent.get("subscription") == p["subscription"])
            and (
                not p.get("collection_method") or inv["collection_method"] == p["collection_method"]
            )
        )

    found = [refresh(st, inv) for inv in st.invoices.values() if keep(inv)]
    return paginate(newest_first(found), p, "/v1/invoices")


@router.route("GET", "/v1/invoices/{id}/lines", list_endpoint())
def invoice_lines(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    inv = refresh(st, st.get(st.invoices, "invoice", ident))
    return paginate(list(inv["lines"]["data"]), p, f"/v1/invoices/{ident}/lines")


@router.route(
    "POST",
    "/v1/invoices/{id}",
    endpoint({"auto_advance": Bool(), "description": Str(), "metadata": METADATA}),
)
def invoices_update(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    inv = st.get(st.invoices, "invoice", ident)
    previous = {k: inv.get(k) for k in p if k != "expand"}
    if "metadata" in p:
        merge_metadata(inv, p["metadata"])
    for key in ("auto_advance", "description"):
        if p.get(key) is not None:
            if inv["status"] != "draft" and key == "auto_advance":
                raise invalid(
                    "auto_advance can only be changed on a draft invoice.", param="auto_advance"
                )
            inv[key] = p[key]
    if p.get("auto_advance") is not None:  # switched on: finalized an hour after creation
        due = max(inv["created"] + st.settings.finalize_delay, st.now())
        inv["automatically_finalizes_at"] = due if inv["auto_advance"] else None
        if inv["auto_advance"]:
            st.schedule_at(due, "finalize", inv["id"])
    st.emit("invoice.updated", refresh(st, inv), previous)
    return inv


@router.route("POST", "/v1/invoices/{id}/finalize", endpoint({"auto_advance": Bool()}))
def invoices_finalize(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return finalize(st, st.get(st.invoices, "invoice", ident))


@router.route(
    "POST",
    "/v1/invoices/{id}/pay",
    endpoint({"paid_out_of_band": Bool(), "payment_method": Str(), "off_session": Bool()}),
)
def invoices_pay(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    inv = st.get(st.invoices, "invoice", ident)
    if inv["status"] == "draft":
        finalize(st, inv)
    if inv["status"] == "paid":
        raise invalid("Invoice is already paid.", code="invoice_already_paid")
    if inv["status"] != "open":
        raise invalid(f"You cannot pay an invoice with status {inv['status']}.")
    mark_paid(st, inv)
    return inv


@router.route("POST", "/v1/invoices/{id}/void", endpoint({}))
def invoices_void(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    inv = st.get(st.invoices, "invoice", ident)
    if inv["status"] != "open":
        raise invalid("You can only void an open invoice.")
    inv["status"] = "void"
    inv["status_transitions"]["voided_at"] = st.now()
    inv["amount_remaining"] = 0
    st.emit("invoice.voided", inv)
    return inv


# invoice items ----------------------------------------------------------------------------------


def _link_item(st: State, inv: dict[str, Any], ii: dict[str, Any]) -> None:
    ii["invoice"] = inv["id"]
    line = {
        "id": st.new_id("il_", 24),
        "object": "line_item",
        "amount": ii["amount"],
        "currency": ii["currency"],
        "description": ii["description"],
        "discount_amounts": [],
        "discountable": ii["discountable"],
        "discounts": [],
        "invoice": inv["id"],
        "livemode": False,
        "metadata": dict(ii["metadata"]),
        "parent": {
            "invoice_item_details": {
                "invoice_item": ii["id"],
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": ii["_subscription"],
            },
            "subscription_item_details": None,
            "type": "invoice_item_details",
        },
        "period": dict(ii["period"]),
        "pretax_credit_amounts": [],
        "pricing": ii["pricing"],
        "quantity": ii["quantity"],
        "subtotal": ii["amount"],
        "taxes": [],
    }
    inv["lines"]["data"].append(line)
    refresh(st, inv)


def public_item(ii: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ii.items() if not k.startswith("_")}


@router.route(
    "POST",
    "/v1/invoiceitems",
    endpoint(
        {
            "amount": Int(),
            "currency": Str(3),
            "customer": Str(),
            "description": Str(),
            "discountable": Bool(),
            "invoice": Str(),
            "metadata": METADATA,
            "period": Obj({"end": Int(), "start": Int()}, ("end", "start")),
            "pricing": Obj({"price": Str()}),
            "quantity": Int(0),
            "subscription": Str(),
            "unit_amount_decimal": Str(),
        }
    ),
)
def invoice_items_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    inv = None
    if p.get("invoice"):
        inv = st.get(st.invoices, "invoice", p["invoice"], "invoice", status=400)
        if inv["status"] != "draft":
            raise invalid(
                f"Invoice {inv['id']} is {inv['status']}; invoice items can only be added to "
                "draft invoices.",
                param="invoice",
                code="invoice_not_editable",
            )
    customer = p.get("customer") or (inv["customer"] if inv else None)
    if not customer:
        raise invalid(
            "Missing required param: customer.", param="customer", code="parameter_missing"
        )
    st.customer(customer)
    if inv and inv["customer"] != customer:
        raise invalid("The invoice belongs to another customer.", param="invoice")
    if p.get("subscription"):
        st.get(st.subscriptions, "subscription", p["subscription"], "subscription", 400)
    quantity = p.get("quantity") or 1
    pricing = None
    price_id = (p.get("pricing") or {}).get("price")
    if price_id:
        price = st.get(st.prices, "price", price_id, "pricing[price]", status=400)
        currency = price["currency"]
        amount = _amount(quantity, price["unit_amount_decimal"])
        pricing = {
            "price_details": {"price": price["id"], "product": price["product"]},
            "type": "price_details",
            "unit_amount_decimal": price["unit_amount_decimal"],
        }
    elif p.get("unit_amount_decimal") is not None:
        currency = p.get("currency") or ""
        amount = _amount(quantity, p["unit_amount_decimal"])
    elif p.get("amount") is not None:
        currency = p.get("currency") or ""
        amount = p["amount"]
    else:
        raise invalid("Missing required param: amount.", param="amount", code="parameter_missing")
    if not currency:
        raise invalid(
            "Missing required param: currency.", param="currency", code="parameter_missing"
        )
    if inv and currency.lower() != inv["currency"]:
        raise invalid("The invoice item's currency must match the invoice's.", param="currency")
    now = st.now()
    ii = {
        "id": st.new_id("ii_", 24),
        "object": "invoiceitem",
        "amount": amount,
        "currency": currency.lower(),
        "customer": customer,
        "date": now,
        "description": p.get("description"),
        "discountable": p.get("discountable", True) is not False,
        "discounts": [],
        "invoice": None,
        "livemode": False,
        "metadata": dict(p.get("metadata") or {}),
        "net_amount": amount,
        "parent": (
            {
                "subscription_details": {
                    "subscription": p["subscription"],
                    "subscription_item": None,
                },
                "type": "subscription_details",
            }
            if p.get("subscription")
            else None
        ),
        "period": p.get("period") or {"end": now, "start": now},
        "pricing": pricing,
        "proration": False,
        "quantity": quantity,
        "tax_rates": [],
        "test_clock": None,
        "_subscription": p.get("subscription"),
    }
    st.invoice_items[ii["id"]] = ii
    if inv is not None:
        _link_item(st, inv, ii)
    out = public_item(ii)
    st.emit("invoiceitem.created", out)
    return out


@router.route("GET", "/v1/invoiceitems/{id}", endpoint({}))
def invoice_items_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return public_item(st.get(st.invoice_items, "invoiceitem", ident))


@router.route("DELETE", "/v1/invoiceitems/{id}", endpoint({}))
def invoice_items_delete(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    ii = st.get(st.invoice_items, "invoiceitem", ident)
    if ii["invoice"]:
        inv = st.invoices[ii["invoice"]]
        if inv["status"] != "draft":
            raise invalid(
                "Invoice items on a finalized invoice cannot be deleted.",
                code="invoice_not_editable",
            )
        inv["lines"]["data"] = [
            line
            for line in inv["lines"]["data"]
            if (line["parent"].get("invoice_item_details") or {}).get("invoice_item") != ident
        ]
        refresh(st, inv)
    del st.invoice_items[ident]
    return {"id": ident, "object": "invoiceitem", "deleted": True}


@router.route(
    "GET",
    "/v1/invoiceitems",
    list_endpoint({"customer": Str(), "invoice": Str(), "pending": Bool()}),
)
def invoice_items_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    found = [
        public_item(ii)
        for ii in st.invoice_items.values()
        if (not p.get("customer") or ii["customer"] == p["customer"])
        and (not p.get("invoice") or ii["invoice"] == p["invoice"])
        and (p.get("pending") is None or (ii["invoice"] is None) == p["pending"])
    ]
    return paginate(newest_first(found), p, "/v1/invoiceitems")
