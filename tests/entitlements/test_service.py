"""The entitlement store: one check, Stripe and manual sources kept apart, Stripe outages."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from billing import logs
from billing.entitlements import SAAS_FEATURE
from billing.entitlements.service import (
    EntitlementError,
    grant_manual,
    has_entitlement,
    list_entitlements,
    refresh_from_stripe,
    revoke_manual,
)
from billing.models import BillingAccount, Entitlement
from billing.stripe_gateway import PermanentStripeError, TransientStripeError


def run_concurrently(call: Callable[[], object], threads: int) -> list[object]:
    """Start `threads` calls at once; their results, or the exceptions they raised."""
    results: list[object] = []

    def run() -> None:
        try:
            results.append(call())
        except Exception as error:  # the caller's assertion shows it
            results.append(error)

    started = [threading.Thread(target=run) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(30)
    return results


def _rows(runtime) -> set[tuple[int, str, str, bool]]:
    with runtime.session_factory() as session:
        return {
            (row.organization_id, row.lookup_key, row.source, row.active)
            for row in session.scalars(sa.select(Entitlement))
        }


class TestHasEntitlement:
    def test_nothing_stored_means_not_entitled(self, billing_runtime):
        assert not has_entitlement(billing_runtime, 1, SAAS_FEATURE)

    def test_a_manual_grant_entitles_only_that_organization_and_feature(self, billing_runtime):
        grant_manual(billing_runtime, 1, SAAS_FEATURE)
        assert has_entitlement(billing_runtime, 1, SAAS_FEATURE)
        assert not has_entitlement(billing_runtime, 2, SAAS_FEATURE)
        assert not has_entitlement(billing_runtime, 1, "analytics")

    def test_accepts_an_open_session(self, billing_runtime):
        grant_manual(billing_runtime, 1, SAAS_FEATURE)
        with billing_runtime.session_factory() as session:
            assert has_entitlement(session, 1, SAAS_FEATURE)

    def test_is_one_indexed_lookup(self, billing_runtime):
        """PostgreSQL's plan for the check uses the (organization, key, source) unique index."""
        with billing_runtime.session_factory() as session:
            session.execute(sa.text("SET LOCAL enable_seqscan = off"))
            plan = "\n".join(
                session.execute(
                    sa.text(
                        "EXPLAIN SELECT id FROM entitlements WHERE organization_id = 1 "
                        "AND lookup_key = 'saas' AND active LIMIT 1"
                    )
                ).scalars()
            )
        assert "uq_entitlements_organization_id_lookup_key_source" in plan


class TestRefreshFromStripe:
    def test_a_subscription_to_the_saas_price_grants_saas(self, saas_catalog, caplog):
        runtime = saas_catalog.runtime
        saas_catalog.subscribe(saas_catalog.customer_for(7))
        with caplog.at_level(logging.INFO, logger="billing"):
            assert refresh_from_stripe(runtime, 7) == {SAAS_FEATURE}
        assert has_entitlement(runtime, 7, SAAS_FEATURE)
        assert _rows(runtime) == {(7, SAAS_FEATURE, "stripe", True)}
        record = next(r for r in caplog.records if r.message == logs.ENTITLEMENTS_REFRESHED)
        assert record.organization_id == 7 and record.granted == [SAAS_FEATURE]

    def test_a_canceled_subscription_revokes_it_and_keeps_the_row(self, saas_catalog):
        runtime = saas_catalog.runtime
        subscription = saas_catalog.subscribe(saas_catalog.customer_for(7))
        refresh_from_stripe(runtime, 7)
        saas_catalog.cancel(subscription)
        assert refresh_from_stripe(runtime, 7) == set()
        assert not has_entitlement(runtime, 7, SAAS_FEATURE)
        assert _rows(runtime) == {(7, SAAS_FEATURE, "stripe", False)}
        saas_catalog.subscribe(saas_catalog.customer_for(7))
        refresh_from_stripe(runtime, 7)
        assert _rows(runtime) == {(7, SAAS_FEATURE, "stripe", True)}

    def test_a_manual_grant_survives_a_refresh_that_finds_nothing(self, saas_catalog):
        runtime = saas_catalog.runtime
        saas_catalog.customer_for(7)  # a customer without any subscription
        grant_manual(runtime, 7, SAAS_FEATURE, note="onboarded by hand")
        assert refresh_from_stripe(runtime, 7) == set()
        assert has_entitlement(runtime, 7, SAAS_FEATURE)
        assert _rows(runtime) == {(7, SAAS_FEATURE, "manual", True)}

    def test_both_sources_coexist_and_each_one_alone_still_entitles(self, saas_catalog):
        runtime = saas_catalog.runtime
        subscription = saas_catalog.subscribe(saas_catalog.customer_for(7))
        grant_manual(runtime, 7, SAAS_FEATURE)
        refresh_from_stripe(runtime, 7)
        assert _rows(runtime) == {
            (7, SAAS_FEATURE, "manual", True),
            (7, SAAS_FEATURE, "stripe", True),
        }
        result = revoke_manual(runtime, 7, SAAS_FEATURE)
        assert result.revoked and result.still_entitled
        assert has_entitlement(runtime, 7, SAAS_FEATURE)
        saas_catalog.cancel(subscription)
        refresh_from_stripe(runtime, 7)
        assert not has_entitlement(runtime, 7, SAAS_FEATURE)

    def test_touches_only_the_given_organization(self, saas_catalog):
        runtime = saas_catalog.runtime
        saas_catalog.subscribe(saas_catalog.customer_for(1))
        saas_catalog.subscribe(saas_catalog.customer_for(2))
        refresh_from_stripe(runtime, 1)
        assert has_entitlement(runtime, 1, SAAS_FEATURE)
        assert not has_entitlement(runtime, 2, SAAS_FEATURE)

    def test_an_organization_without_a_customer_has_no_stripe_entitlements(
        self, billing_runtime, emulator
    ):
        assert refresh_from_stripe(billing_runtime, 99) == set()
        asked = emulator.stats()["requests"]
        assert not [call for call in asked if "/v1/entitlements" in call]  # nothing to ask

    def test_reads_every_page_of_active_entitlements(self, saas_catalog):
        runtime = saas_catalog.runtime
        client = runtime.stripe.client
        product = saas_catalog.product("Everything")
        wanted = {f"feature_{n:03d}" for n in range(105)}
        for key in sorted(wanted):
            feature = client.v1.entitlements.features.create({"lookup_key": key, "name": key})
            client.v1.products.features.create(product.id, {"entitlement_feature": feature.id})
        saas_catalog.subscribe(saas_catalog.customer_for(3), product.default_price)
        assert refresh_from_stripe(runtime, 3) == wanted
        assert {r.feature for r in list_entitlements(runtime, 3)} == wanted

    def test_a_stripe_outage_changes_nothing_and_the_gate_still_answers(
        self, saas_catalog, emulator
    ):
        runtime = saas_catalog.runtime
        subscription = saas_catalog.subscribe(saas_catalog.customer_for(7))
        refresh_from_stripe(runtime, 7)
        saas_catalog.cancel(subscription)
        emulator.faults({"path": "/v1/entitlements/active_entitlements", "status": 503})
        with pytest.raises(TransientStripeError):
            refresh_from_stripe(runtime, 7)
        # The refresh failed as a whole: the stored answer stands until Stripe answers again.
        assert _rows(runtime) == {(7, SAAS_FEATURE, "stripe", True)}
        assert has_entitlement(runtime, 7, SAAS_FEATURE)

    def test_a_customer_stripe_does_not_know_is_an_error_not_a_revocation(self, saas_catalog):
        runtime = saas_catalog.runtime
        saas_catalog.subscribe(saas_catalog.customer_for(7))
        refresh_from_stripe(runtime, 7)
        with runtime.session_factory.begin() as session:
            session.get(BillingAccount, 7).stripe_customer_id = "cus_unknown"
        with pytest.raises(PermanentStripeError) as raised:
            refresh_from_stripe(runtime, 7)
        assert "No such customer" in str(raised.value)
        assert has_entitlement(runtime, 7, SAAS_FEATURE)

    def test_concurrent_refreshes_of_one_organization_take_turns(self, saas_catalog, emulator):
        runtime = saas_catalog.runtime
        saas_catalog.subscribe(saas_catalog.customer_for(7))
        emulator.faults(
            {"path": "/v1/entitlements/active_entitlements", "latency_ms": 300, "count": 4}
        )
        results = run_concurrently(lambda: refresh_from_stripe(runtime, 7), 4)
        assert results == [{SAAS_FEATURE}] * 4
        assert _rows(runtime) == {(7, SAAS_FEATURE, "stripe", True)}


class TestManualGrants:
    def test_grant_is_idempotent_and_keeps_the_note(self, billing_runtime):
        first = grant_manual(billing_runtime, 4, SAAS_FEATURE, note="contract 2026-11")
        again = grant_manual(billing_runtime, 4, SAAS_FEATURE)
        assert first.active and again.active and again.note == "contract 2026-11"
        assert _rows(billing_runtime) == {(4, SAAS_FEATURE, "manual", True)}

    def test_revocation_locks_again_and_a_new_grant_reopens(self, billing_runtime):
        grant_manual(billing_runtime, 4, SAAS_FEATURE)
        result = revoke_manual(billing_runtime, 4, SAAS_FEATURE)
        assert result.revoked and not result.still_entitled
        assert not has_entitlement(billing_runtime, 4, SAAS_FEATURE)
        assert [r.active for r in list_entitlements(billing_runtime, 4, include_inactive=True)] == [
            False
        ]
        grant_manual(billing_runtime, 4, SAAS_FEATURE)
        assert has_entitlement(billing_runtime, 4, SAAS_FEATURE)

    def test_revoking_what_was_never_granted_is_an_error(self, billing_runtime):
        with pytest.raises(EntitlementError, match="no active manual grant"):
            revoke_manual(billing_runtime, 4, SAAS_FEATURE)

    def test_revoke_never_touches_a_stripe_row(self, saas_catalog):
        runtime = saas_catalog.runtime
        saas_catalog.subscribe(saas_catalog.customer_for(7))
        refresh_from_stripe(runtime, 7)
        with pytest.raises(EntitlementError):
            revoke_manual(runtime, 7, SAAS_FEATURE)
        assert has_entitlement(runtime, 7, SAAS_FEATURE)

    @pytest.mark.parametrize("feature", ["", "   ", "x" * 81])
    def test_bad_feature_names_are_refused(self, billing_runtime, feature):
        with pytest.raises(EntitlementError, match="lookup key"):
            grant_manual(billing_runtime, 4, feature)
        assert _rows(billing_runtime) == set()

    def test_concurrent_grants_leave_one_row(self, billing_runtime):
        results = run_concurrently(lambda: grant_manual(billing_runtime, 4, SAAS_FEATURE).active, 8)
        assert results == [True] * 8
        assert _rows(billing_runtime) == {(4, SAAS_FEATURE, "manual", True)}
