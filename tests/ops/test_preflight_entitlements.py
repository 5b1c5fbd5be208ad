"""Preflight's `saas_upgrade` check: a price that would take money and never unlock fails."""

from __future__ import annotations

from billing.checks.report import Status
from billing.ops.preflight import run_preflight


def saas_check(report) -> tuple[Status, str]:
    found = next(c for c in report.checks if c.check == "saas_upgrade")
    return found.status, found.detail


def preflight(make_runtime, settings):
    return run_preflight(make_runtime(settings), require_enabled=True)


def test_booking_mode_passes_and_names_the_booking_page(billing_runtime):
    status, detail = saas_check(run_preflight(billing_runtime, require_enabled=True))
    assert status is Status.PASS
    assert detail.startswith("booking mode (STRIPE_SAAS_PRICE_ID unset)")


def test_a_price_whose_product_grants_saas_passes(make_runtime, saas_catalog):
    settings = saas_catalog.runtime.settings.replace(saas_price_id=saas_catalog.price_id)
    report = preflight(make_runtime, settings)
    assert report.ok, report.table()
    status, detail = saas_check(report)
    assert status is Status.PASS and detail.startswith("upgrade mode:")


def test_a_price_without_the_saas_feature_fails(make_runtime, saas_catalog):
    plain = saas_catalog.product("No features", 900)
    settings = saas_catalog.runtime.settings.replace(saas_price_id=plain.default_price)
    report = preflight(make_runtime, settings)
    status, detail = saas_check(report)
    assert status is Status.FAIL and not report.ok
    assert f"its product {plain.id} does not grant the `saas` feature" in detail


def test_an_unknown_or_archived_price_fails(make_runtime, saas_catalog):
    settings = saas_catalog.runtime.settings
    status, detail = saas_check(
        preflight(make_runtime, settings.replace(saas_price_id="price_nope"))
    )
    assert status is Status.FAIL and "price_nope does not exist" in detail
    saas_catalog.runtime.stripe.client.v1.prices.update(saas_catalog.price_id, {"active": False})
    archived = settings.replace(saas_price_id=saas_catalog.price_id)
    status, detail = saas_check(preflight(make_runtime, archived))
    assert status is Status.FAIL and f"{saas_catalog.price_id} is archived" in detail


def test_skipped_when_stripe_is_unreachable(make_runtime, saas_catalog):
    settings = saas_catalog.runtime.settings.replace(
        saas_price_id=saas_catalog.price_id,
        stripe_api_base="http://127.0.0.1:9",
        stripe_max_network_retries=0,
    )
    status, _ = saas_check(preflight(make_runtime, settings))
    assert status is Status.SKIP
