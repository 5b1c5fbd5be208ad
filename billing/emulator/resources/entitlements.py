"""Entitlement features, product features and a customer's active entitlements.

A customer's active entitlements are the features of the products of their live subscriptions;
whenever that set changes, `entitlements.active_entitlement_summary.updated` is emitted.
"""

from __future__ import annotations

from typing import Any

from billing.emulator.errors import invalid, missing
from billing.emulator.params import METADATA, Bool, Int, Str, endpoint, list_endpoint
from billing.emulator.resources.core import merge_metadata
from billing.emulator.router import router
from billing.emulator.state import State, newest_first, paginate

LIVE_STATUSES = ("active", "trialing", "past_due")


@router.route(
    "POST",
    "/v1/entitlements/features",
    endpoint(
        {"lookup_key": Str(80), "metadata": METADATA, "name": Str(80)}, ("lookup_key", "name")
    ),
)
def features_create(st: State, p: dict[str, Any]) -> dict[str, Any]:
    if p["lookup_key"] in st.feature_by_lookup:
        raise invalid(
            f"A feature with lookup_key `{p['lookup_key']}` already exists.", param="lookup_key"
        )
    feat = {
        "id": st.new_id("feat_test_", 24),
        "object": "entitlements.feature",
        "active": True,
        "livemode": False,
        "lookup_key": p["lookup_key"],
        "metadata": dict(p.get("metadata") or {}),
        "name": p["name"],
    }
    st.features[feat["id"]] = feat
    st.feature_by_lookup[feat["lookup_key"]] = feat["id"]
    return feat


@router.route("GET", "/v1/entitlements/features/{id}", endpoint({}))
def features_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    return st.get(st.features, "feature", ident)


@router.route(
    "POST",
    "/v1/entitlements/features/{id}",
    endpoint({"active": Bool(), "metadata": METADATA, "name": Str(80)}),
)
def features_update(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    feat = st.get(st.features, "feature", ident)
    if "metadata" in p:
        merge_metadata(feat, p["metadata"])
    for key in ("active", "name"):
        if p.get(key) is not None:
            feat[key] = p[key]
    if p.get("active") is False:
        sync_all(st)
    return feat


@router.route(
    "GET",
    "/v1/entitlements/features",
    list_endpoint({"archived": Bool(), "lookup_key": Str(80)}),
)
def features_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    found = [
        f
        for f in st.features.values()
        if (p.get("archived") is None or f["active"] is not p["archived"])
        and (not p.get("lookup_key") or f["lookup_key"] == p["lookup_key"])
    ]
    return paginate(newest_first(found), p, "/v1/entitlements/features")


@router.route(
    "POST",
    "/v1/products/{id}/features",
    endpoint({"entitlement_feature": Str()}, ("entitlement_feature",)),
)
def product_features_create(st: State, p: dict[str, Any], product: str) -> dict[str, Any]:
    st.get(st.products, "product", product)
    feat = st.get(st.features, "feature", p["entitlement_feature"], "entitlement_feature", 400)
    for pf in st.product_features.values():
        if pf["_product"] == product and pf["entitlement_feature"]["id"] == feat["id"]:
            raise invalid(
                "This feature is already attached to the product.", param="entitlement_feature"
            )
    pf = {
        "id": st.new_id("prodft_", 24),
        "object": "product_feature",
        "entitlement_feature": feat,
        "livemode": False,
        "_product": product,
    }
    st.product_features[pf["id"]] = pf
    sync_all(st)
    return public(pf)


def public(pf: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pf.items() if not k.startswith("_")}


@router.route("GET", "/v1/products/{id}/features", list_endpoint())
def product_features_list(st: State, p: dict[str, Any], product: str) -> dict[str, Any]:
    st.get(st.products, "product", product)
    found = [public(pf) for pf in st.product_features.values() if pf["_product"] == product]
    return paginate(newest_first(found), p, f"/v1/products/{product}/features")


@router.route("GET", "/v1/products/{product}/features/{id}", endpoint({}))
def product_features_retrieve(st: State, p: dict[str, Any], product: str, ident: str) -> Any:
    pf = st.get(st.product_features, "product_feature", ident)
    if pf["_product"] != product:
        raise missing("product_feature", ident)
    return public(pf)


@router.route("DELETE", "/v1/products/{product}/features/{id}", endpoint({}))
def product_features_delete(st: State, p: dict[str, Any], product: str, ident: str) -> Any:
    pf = st.get(st.product_features, "product_feature", ident)
    if pf["_product"] != product:
        raise missing("product_feature", ident)
    del st.product_features[ident]
    sync_all(st)
    return {"id": ident, "object": "product_feature", "deleted": True}


# active entitlements ----------------------------------------------------------------------------


def _entitled_features(st: State, customer: str) -> list[str]:
    products = {
        item["price"]["product"]
        for sub in st.subscriptions.values()
        if sub["customer"] == customer and sub["status"] in LIVE_STATUSES
        for item in sub["items"]["data"]
    }
    seen: list[str] = []
    for pf in st.product_features.values():
        feat = pf["entitlement_feature"]
        if pf["_product"] in products and feat["active"] and feat["id"] not in seen:
            seen.append(feat["id"])
    return seen


def _summary(st: State, customer: str, ents: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "object": "entitlements.active_entitlement_summary",
        "customer": customer,
        "entitlements": {
            "object": "list",
            "data": ents,
            "has_more": False,
            "url": f"/v1/customer/{customer}/entitlements",
        },
        "livemode": False,
    }


def sync(st: State, customer: str) -> None:
    """Recompute one customer's active entitlements; emit the summary event when they change."""
    current = st.active_entitlements.get(customer, {})
    wanted = _entitled_features(st, customer)
    if list(current) == wanted:
        return
    updated: dict[str, dict[str, Any]] = {}
    for feat_id in wanted:
        updated[feat_id] = current.get(feat_id) or {
            "id": st.new_id("ent_test_", 24),
            "object": "entitlements.active_entitlement",
            "feature": feat_id,
            "livemode": False,
            "lookup_key": st.features[feat_id]["lookup_key"],
        }
    st.active_entitlements[customer] = updated
    st.emit(
        "entitlements.active_entitlement_summary.updated",
        _summary(st, customer, list(updated.values())),
        {"entitlements": {"data": list(current.values())}},
    )


def sync_all(st: State) -> None:
    for customer in {s["customer"] for s in st.subscriptions.values()} | set(
        st.active_entitlements
    ):
        sync(st, customer)


@router.route(
    "GET",
    "/v1/entitlements/active_entitlements",
    endpoint(
        {"customer": Str(), "ending_before": Str(), "limit": Int(1, 100), "starting_after": Str()},
        ("customer",),
    ),
)
def active_entitlements_list(st: State, p: dict[str, Any]) -> dict[str, Any]:
    st.customer(p["customer"])
    ents = list(st.active_entitlements.get(p["customer"], {}).values())
    return paginate(ents, p, "/v1/entitlements/active_entitlements")


@router.route("GET", "/v1/entitlements/active_entitlements/{id}", endpoint({}))
def active_entitlements_retrieve(st: State, p: dict[str, Any], ident: str) -> dict[str, Any]:
    for ents in st.active_entitlements.values():
        for ent in ents.values():
            if ent["id"] == ident:
                return ent
    raise missing("active_entitlement", ident)
