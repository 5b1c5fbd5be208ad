"""Customers, products, prices and events."""

from __future__ import annotations

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
from billing.emulator.router import router
from billing.emulator.state import State, newest_first, paginate

ADDRESS = Obj({k: Str() for k in ("city", "country", "line1", "line2", "postal_code", "state")})

_CUSTOMER_FIELDS = {
    "address": ADDRESS,
    "description": Str(),
    "email": Str(512),
    "metadata": METADATA,
    "name": Str(256),
    "phone": Str(20),
    "preferred_locales": List(Str()),
}


def merge_metadata(obj: dict[str, Any], update: dict[str, str] | None) -> None:
    if update is None:
        return
    if not update:  # `metadata=""` clears all keys
        obj["metadata"] = {}
        return
    for key, value in update.items():
        if value == "":
            obj["metadata"].pop(key, None)
        else:
            obj["metadata"][key] = value


def create_customer(st: State, p: dict[str, Any]) -> dict[str, Any]:
    cus = _store_customer(st, p, st.now())
    st.emit("customer.created", cus)
    return cus


# A bulk fixture, not Stripe's: enough for a benchmark's million groups in one call.
MAX_BULK_CUSTOMERS = 1_000_000
SEQUENCE = "{n}"  # in a bulk name or metadata value: the customer's sequence number


def create_customers(
    st: State, count: int, start: int, name: str | None, metadata: dict[str, str]
) -> list[str]:
    """`count` customers numbered `start`, `start + 1`, …; `{n}` in `name` and in each metadata
    value becomes the number. No `customer.created` events: each would be copied and queued for
    the webhook sender, which costs more than the customer (a bench sets up 200,000)."""
    now = st.now()
    ids = []
    for n in range(start, start + count):
        number = str(n)
        p = {
            "name": None if name is None else name.replace(SEQUENCE, number),
            "metadata": {k: v.replace(SEQUENCE, number) for k, v in metadata.items()},
        }
        ids.append(_store_customer(st, p, now)["id"])
    return ids


def _store_customer(st: State, p: dict[str, Any], now: int) -> dict[str, Any]:
    cus = {
        "id": st.new_id("cus_"),
        "object": "customer",
        "address": p.get("address"),
        "balance": 0,
        "created": now,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": p.get("description"),
        "discount": None,
        "email": p.get("email"),
        "invoice_prefix": st.new_id("", 8).upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": dict(p.get("metadata") or {}),
        "name": p.get("name"),
        "next_invoice_sequence": 1,
        "phone": p.get("phone"),
        "preferred_locales": p.get("preferred_locales") or [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }
    st.customers[cus["id"]] = cus
    return cus


@router.route("POST", "/v1/customers", endpoint(_CUSTOMER_FIELDS))
def customers_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    return create_customer(st, p)


@router.route("GET", "/v1/customers/{id}", endpoint({}))
def customers_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return st.get(st.customers, "customer", ident)


@router.route("POST", "/v1/customers/{id}", endpoint(_CUSTOMER_FIELDS))
def customers_update(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    cus = st.get(st.customers, "customer", ident)
    if cus.get("deleted"):
        raise invalid(f"No such customer: '{ident}'", code="resource_missing", param="id")
    previous = {k: cus.get(k) for k in p if k != "expand"}
    for key, value in p.items():
        if key == "metadata":
            merge_metadata(cus, value)
        elif key != "expand":
            cus[key] = value
    st.emit("customer.updated", cus, previous)
    return cus


@router.route("DELETE", "/v1/customers/{id}", endpoint({}))
def customers_delete(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    cus = st.get(st.customers, "customer", ident)
    st.emit("customer.deleted", cus)
    tomb = {"id": ident, "object": "customer", "deleted": True}
    st.customers[ident] = tomb
    return tomb


@router.route("GET", "/v1/customers", list_endpoint({"email": Str(512)}))
def customers_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    found = [
        c
        for c in st.customers.values()
        if not c.get("deleted")
        and in_range(c["created"], p.get("created"))
        and ("email" not in p or c.get("email") == p["email"])
    ]
    return paginate(newest_first(found), p, "/v1/customers")


# products ---------------------------------------------------------------------------------------

_PRODUCT_FIELDS = {
    "active": Bool(),
    "description": Str(),
    "images": List(Str()),
    "marketing_features": List(Obj({"name": Str()})),
    "metadata": METADATA,
    "name": Str(),
    "statement_descriptor": Str(22),
    "tax_code": Str(),
    "unit_label": Str(12),
    "url": Str(),
}


def create_product(st: State, p: dict[str, Any]) -> dict[str, Any]:
    now = st.now()
    ident = p.get("id") or st.new_id("prod_")
    if ident in st.products:
        raise invalid("Product already exists.", param="id", code="resource_already_exists")
    prod = {
        "id": ident,
        "object": "product",
        "active": p.get("active", True) is not False,
        "created": now,
        "default_price": None,
        "description": p.get("description"),
        "images": p.get("images") or [],
        "livemode": False,
        "marketing_features": p.get("marketing_features") or [],
        "metadata": dict(p.get("metadata") or {}),
        "name": p["name"],
        "package_dimensions": None,
        "shippable": None,
        "statement_descriptor": p.get("statement_descriptor"),
        "tax_code": p.get("tax_code"),
        "type": "service",
        "unit_label": p.get("unit_label"),
        "updated": now,
        "url": p.get("url"),
    }
    st.products[ident] = prod
    st.emit("product.created", prod)
    return prod


@router.route(
    "POST",
    "/v1/products",
    endpoint(
        {
            **_PRODUCT_FIELDS,
            "id": Str(),
            "default_price_data": Obj(
                {
                    "currency": Str(3),
                    "unit_amount": Int(0),
                    "unit_amount_decimal": Str(),
                    "recurring": Obj(
                        {
                            "interval": Str(choices=("day", "week", "month", "year")),
                            "interval_count": Int(1),
                        },
                        ("interval",),
                    ),
                },
                ("currency",),
            ),
        },
        ("name",),
    ),
)
def products_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    prod = create_product(st, p)
    if p.get("default_price_data"):
        price = create_price(st, {**p["default_price_data"], "product": prod["id"]})
        prod["default_price"] = price["id"]
    return prod


@router.route("GET", "/v1/products/{id}", endpoint({}))
def products_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return st.get(st.products, "product", ident)


@router.route("POST", "/v1/products/{id}", endpoint({**_PRODUCT_FIELDS, "default_price": Str()}))
def products_update(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    prod = st.get(st.products, "product", ident)
    previous = {k: prod.get(k) for k in p if k != "expand"}
    for key, value in p.items():
        if key == "metadata":
            merge_metadata(prod, value)
        elif key == "default_price" and value:
            st.get(st.prices, "price", value, "default_price", status=400)
            prod[key] = value
        elif key != "expand":
            prod[key] = value
    prod["updated"] = st.now()
    st.emit("product.updated", prod, previous)
    return prod


@router.route("GET", "/v1/products", list_endpoint({"active": Bool(), "ids": List(Str())}))
def products_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    found = [
        x
        for x in st.products.values()
        if in_range(x["created"], p.get("created"))
        and (p.get("active") is None or x["active"] == p["active"])
        and (not p.get("ids") or x["id"] in p["ids"])
    ]
    return paginate(newest_first(found), p, "/v1/products")


# prices -----------------------------------------------------------------------------------------

_RECURRING = Obj(
    {
        "interval": Str(choices=("day", "week", "month", "year")),
        "interval_count": Int(1),
        "meter": Str(),
        "usage_type": Str(choices=("licensed", "metered")),
        "trial_period_days": Int(0),
    },
    ("interval",),
)
_PRICE_FIELDS = {
    "active": Bool(),
    "billing_scheme": Str(choices=("per_unit",)),
    "currency": Str(3),
    "lookup_key": Str(200),
    "metadata": METADATA,
    "nickname": Str(),
    "product": Str(),
    "product_data": Obj({"name": Str(), "metadata": METADATA, "unit_label": Str(12)}, ("name",)),
    "recurring": _RECURRING,
    "tax_behavior": Str(choices=("exclusive", "inclusive", "unspecified")),
    "transfer_lookup_key": Bool(),
    "unit_amount": Int(0),
    "unit_amount_decimal": Str(),
}


def create_price(st: State, p: dict[str, Any]) -> dict[str, Any]:
    if not p.get("product") and not p.get("product_data"):
        raise invalid("Missing required param: product.", param="product", code="parameter_missing")
    if p.get("product") and p.get("product_data"):
        raise invalid("You may only specify one of these parameters: product, product_data.")
    if p.get("product"):
        product = st.get(st.products, "product", p["product"], "product", status=400)
    else:
        product = create_product(st, dict(p["product_data"]))
    amount, decimal = p.get("unit_amount"), p.get("unit_amount_decimal")
    if amount is None and decimal is None:
        raise invalid(
            "Missing required param: unit_amount.", param="unit_amount", code="parameter_missing"
        )
    if amount is not None and decimal is not None:
        raise invalid(
            "You may only specify one of these parameters: unit_amount, unit_amount_decimal.",
            param="unit_amount_decimal",
        )
    if decimal is not None:
        try:
            float(decimal)
        except ValueError as exc:
            raise invalid(f"Invalid decimal: {decimal}", param="unit_amount_decimal") from exc
    recurring = None
    if p.get("recurring"):
        r = p["recurring"]
        usage_type = r.get("usage_type") or "licensed"
        meter = r.get("meter")
        if usage_type == "metered" and not meter:
            raise invalid(
                "Metered prices must be backed by a meter: pass recurring[meter].",
                param="recurring[meter]",
            )
        if meter:
            if usage_type != "metered":
                raise invalid(
                    "recurring[meter] requires recurring[usage_type]=metered.",
                    param="recurring[meter]",
                )
            st.get(st.meters, "billing.meter", meter, "recurring[meter]", status=400)
        recurring = {
            "interval": r["interval"],
            "interval_count": r.get("interval_count") or 1,
            "meter": meter,
            "trial_period_days": r.get("trial_period_days"),
            "usage_type": usage_type,
        }
    lookup_key = p.get("lookup_key")
    if lookup_key and not p.get("transfer_lookup_key"):
        if any(x.get("lookup_key") == lookup_key for x in st.prices.values()):
            raise invalid(
                f"A price (`{lookup_key}`) already uses that lookup key.", param="lookup_key"
            )
    elif lookup_key:
        for other in st.prices.values():
            if other.get("lookup_key") == lookup_key:
                other["lookup_key"] = None
    price = {
        "id": st.new_id("price_", 24),
        "object": "price",
        "active": p.get("active", True) is not False,
        "billing_scheme": "per_unit",
        "created": st.now(),
        "currency": p["currency"].lower(),
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": lookup_key,
        "metadata": dict(p.get("metadata") or {}),
        "nickname": p.get("nickname"),
        "product": product["id"],
        "recurring": recurring,
        "tax_behavior": p.get("tax_behavior") or "unspecified",
        "tiers_mode": None,
        "transform_quantity": None,
        "type": "recurring" if recurring else "one_time",
        "unit_amount": amount if amount is not None else None,
        "unit_amount_decimal": str(amount) if amount is not None else decimal,
    }
    st.prices[price["id"]] = price
    st.emit("price.created", price)
    return price


@router.route("POST", "/v1/prices", endpoint(_PRICE_FIELDS, ("currency",)))
def prices_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    return create_price(st, p)


@router.route("GET", "/v1/prices/{id}", endpoint({}))
def prices_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return st.get(st.prices, "price", ident)


@router.route(
    "POST",
    "/v1/prices/{id}",
    endpoint(
        {
            "active": Bool(),
            "lookup_key": Str(200),
            "metadata": METADATA,
            "nickname": Str(),
            "transfer_lookup_key": Bool(),
        }
    ),
)
def prices_update(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    price = st.get(st.prices, "price", ident)
    previous = {k: price.get(k) for k in p if k not in ("expand", "transfer_lookup_key")}
    for key, value in p.items():
        if key == "metadata":
            merge_metadata(price, value)
        elif key not in ("expand", "transfer_lookup_key"):
            price[key] = value
    st.emit("price.updated", price, previous)
    return price


@router.route(
    "GET",
    "/v1/prices",
    list_endpoint(
        {
            "active": Bool(),
            "currency": Str(3),
            "lookup_keys": List(Str()),
            "product": Str(),
            "type": Str(choices=("one_time", "recurring")),
            "recurring": Obj({"interval": Str(), "meter": Str(), "usage_type": Str()}),
        }
    ),
)
def prices_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    rec = p.get("recurring") or {}

    def keep(x: dict[str, Any]) -> bool:
        r = x.get("recurring") or {}
        return (
            in_range(x["created"], p.get("created"))
            and (p.get("active") is None or x["active"] == p["active"])
            and (not p.get("currency") or x["currency"] == p["currency"])
            and (not p.get("lookup_keys") or x.get("lookup_key") in p["lookup_keys"])
            and (not p.get("product") or x["product"] == p["product"])
            and (not p.get("type") or x["type"] == p["type"])
            and all(r.get(k) == v for k, v in rec.items())
        )

    return paginate(newest_first(filter(keep, st.prices.values())), p, "/v1/prices")


# events -----------------------------------------------------------------------------------------


@router.route("GET", "/v1/events/{id}", endpoint({}))
def events_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return st.get(st.events, "event", ident)


@router.route(
    "GET",
    "/v1/events",
    list_endpoint({"type": Str(), "types": List(Str(), 20), "delivery_success": Bool()}),
)
def events_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    wanted = set(p.get("types") or [])
    pattern = p.get("type")

    def keep(e: dict[str, Any]) -> bool:
        if not in_range(e["created"], p.get("created")):
            return False
        if wanted and e["type"] not in wanted:
            return False
        if pattern:  # Stripe allows one `*` wildcard, e.g. `invoice.*`
            if "*" in pattern:
                head, _, tail = pattern.partition("*")
                return e["type"].startswith(head) and e["type"].endswith(tail)
            return e["type"] == pattern
        return True

    return paginate(newest_first(filter(keep, st.events.values())), p, "/v1/events")
