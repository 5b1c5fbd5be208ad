"""`flask billing entitlements ...`: output, exit codes, and what each command stores."""

from __future__ import annotations

import json

import pytest

from billing import create_app
from billing.entitlements import SAAS_FEATURE
from billing.entitlements.service import has_entitlement


def invoke(settings, *args):
    return create_app(settings).test_cli_runner().invoke(args=["billing", "entitlements", *args])


def test_grant_list_revoke_round_trip(billing_runtime):
    settings = billing_runtime.settings
    granted = invoke(settings, "grant", "--org-id", "12", "--feature", "saas", "--note", "pilot")
    assert granted.exit_code == 0, granted.output
    assert json.loads(granted.stdout)["source"] == "manual"
    assert has_entitlement(billing_runtime, 12, SAAS_FEATURE)

    listed = json.loads(invoke(settings, "list").stdout)["entitlements"]
    assert [(e["organization_id"], e["feature"], e["source"], e["note"]) for e in listed] == [
        (12, "saas", "manual", "pilot")
    ]

    revoked = invoke(settings, "revoke", "--org-id", "12", "--feature", "saas")
    assert revoked.exit_code == 0, revoked.output
    assert json.loads(revoked.stdout) == {
        "organization_id": 12,
        "feature": "saas",
        "revoked": True,
        "still_entitled": False,
    }
    assert not has_entitlement(billing_runtime, 12, SAAS_FEATURE)
    assert json.loads(invoke(settings, "list").stdout)["entitlements"] == []
    every = json.loads(invoke(settings, "list", "--all", "--org-id", "12").stdout)
    assert [e["active"] for e in every["entitlements"]] == [False]


def test_feature_defaults_to_saas(billing_runtime):
    assert invoke(billing_runtime.settings, "grant", "--org-id", "3").exit_code == 0
    assert has_entitlement(billing_runtime, 3, SAAS_FEATURE)


def test_revoking_nothing_exits_one_with_a_clear_message(billing_runtime):
    result = invoke(billing_runtime.settings, "revoke", "--org-id", "12")
    assert result.exit_code == 1
    assert "organization 12 has no active manual grant of 'saas'" in result.output


def test_revoke_warns_when_stripe_still_entitles(saas_catalog):
    runtime = saas_catalog.runtime
    saas_catalog.subscribe(saas_catalog.customer_for(5))
    assert invoke(runtime.settings, "grant", "--org-id", "5").exit_code == 0
    refreshed = invoke(runtime.settings, "refresh", "--org-id", "5")
    assert refreshed.exit_code == 0, refreshed.output
    assert json.loads(refreshed.stdout) == {"organization_id": 5, "stripe_lookup_keys": ["saas"]}
    result = invoke(runtime.settings, "revoke", "--org-id", "5")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["still_entitled"] is True
    assert "still holds saas from Stripe" in result.stderr
    assert has_entitlement(runtime, 5, SAAS_FEATURE)


def test_refresh_during_a_stripe_outage_exits_one_and_keeps_access(saas_catalog, emulator):
    runtime = saas_catalog.runtime
    saas_catalog.subscribe(saas_catalog.customer_for(5))
    assert invoke(runtime.settings, "refresh", "--org-id", "5").exit_code == 0
    emulator.faults({"path": "/v1/entitlements/active_entitlements", "status": 500})
    result = invoke(runtime.settings, "refresh", "--org-id", "5")
    assert result.exit_code == 1
    assert "APIError" in result.output
    assert has_entitlement(runtime, 5, SAAS_FEATURE)


@pytest.mark.parametrize(
    "args",
    [
        ("grant",),
        ("grant", "--org-id", "0"),
        ("grant", "--org-id", "abc"),
        ("revoke", "--feature", "saas"),
        ("refresh",),
    ],
)
def test_bad_flags_exit_two(billing_runtime, args):
    assert invoke(billing_runtime.settings, *args).exit_code == 2


def test_a_bad_feature_exits_one(billing_runtime):
    result = invoke(billing_runtime.settings, "grant", "--org-id", "3", "--feature", "x" * 81)
    assert result.exit_code == 1
    assert "lookup key of 1 to 80 characters" in result.output


def test_demo_price_creates_a_price_that_grants_saas(billing_runtime):
    result = invoke(billing_runtime.settings, "demo_price", "--amount-cents", "1500")
    assert result.exit_code == 0, result.output
    price_id = json.loads(result.stdout)["price_id"]
    price = billing_runtime.stripe.client.v1.prices.retrieve(price_id)
    assert (price.unit_amount, price.recurring.interval) == (1500, "month")
    features = billing_runtime.stripe.client.v1.products.features.list(price.product)
    assert [f.entitlement_feature.lookup_key for f in features.data] == [SAAS_FEATURE]


def test_demo_price_refuses_a_live_key(billing_runtime):
    live = billing_runtime.settings.replace(stripe_secret_key="sk_live_" + "x" * 24)
    result = invoke(live, "demo_price")
    assert result.exit_code == 1
    assert "test mode only" in result.output
