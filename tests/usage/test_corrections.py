"""Recording a usage correction: every refusal writes nothing; a retraction may not take a group
below what Stripe was billed (earlier corrections included, whether applied yet or not)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing.models import BillingAccount, UsageCorrection
from billing.usage.corrections import CorrectionError
from billing.usage.service import flush_pass
from tests.factories import add_accounts
from tests.usage.test_correcting import ORG, correct, this_hour, usage


def recorded(runtime) -> int:
    with runtime.session_factory() as session:
        return int(session.scalar(sa.select(sa.func.count()).select_from(UsageCorrection)))


def set_period(runtime, start, end) -> None:
    with runtime.session_factory.begin() as session:
        session.execute(
            sa.update(BillingAccount)
            .where(BillingAccount.organization_id == ORG)
            .values(current_period_start=start, current_period_end=end)
        )


@pytest.fixture
def billed_twelve(billing_runtime, emulator):
    add_accounts(billing_runtime, [ORG])
    hour = this_hour(2)
    usage(billing_runtime, hour, 5, 7)
    assert flush_pass(billing_runtime).ok
    return hour


def refused(runtime, *args, **kwargs) -> str:
    before = recorded(runtime)
    with pytest.raises(CorrectionError) as raised:
        correct(runtime, *args, **kwargs)
    assert recorded(runtime) == before, "a refusal recorded something"
    return str(raised.value)


def test_a_retraction_larger_than_billed_is_refused(billing_runtime, billed_twelve):
    message = refused(billing_runtime, billed_twelve, -13)
    assert "retraction of 13 exceeds the 12 billed for organization 7, api_call" in message
    assert "nothing was recorded" in message
    # All of it may be retracted.
    assert correct(billing_runtime, billed_twelve, -12)["billed_before"] == 12


def test_an_unapplied_correction_reserves_what_it_retracts(billing_runtime, billed_twelve):
    correct(billing_runtime, billed_twelve, -8)  # requested, not yet applied
    with pytest.raises(CorrectionError, match="retraction of 5 exceeds the 4 billed"):
        correct(billing_runtime, billed_twelve, -5)
    assert recorded(billing_runtime) == 1
    flush_pass(billing_runtime)  # applied: still 4 left
    with pytest.raises(CorrectionError, match="retraction of 5 exceeds the 4 billed"):
        correct(billing_runtime, billed_twelve, -5)
    assert correct(billing_runtime, billed_twelve, -4)["billed_before"] == 4


def test_pending_usage_is_not_counted_as_billed(billing_runtime, emulator):
    add_accounts(billing_runtime, [ORG])
    hour = this_hour(1)
    usage(billing_runtime, hour, 9)  # claimed by no flush yet
    assert "exceeds the 0 billed" in refused(billing_runtime, hour, -1)


@pytest.mark.parametrize(
    ("change", "wanted"),
    [
        ({"delta": 0}, "must not be 0"),
        ({"shift": timedelta(minutes=30)}, "must be the start of an hour"),
        ({"shift": timedelta(hours=5)}, "lies ahead"),
        ({"event_type": "nope"}, "has no meter in STRIPE_BILLING_METERS"),
        ({"org": 99}, "organization 99 has no billing account with a Stripe customer"),
        ({"reason": "  "}, "needs a reason"),
        ({"key": "upstream:1"}, "are upstream's"),
    ],
)
def test_bad_values_are_refused(billing_runtime, billed_twelve, change, wanted):
    hour = billed_twelve + change.pop("shift", timedelta(0))
    delta = change.pop("delta", -1)
    assert wanted in refused(billing_runtime, hour, delta, **change)


def test_a_positive_correction_of_an_invoiced_period_is_refused(billing_runtime, billed_twelve):
    period_start = billed_twelve + timedelta(hours=1)
    set_period(billing_runtime, period_start, period_start + timedelta(days=30))
    message = refused(billing_runtime, billed_twelve, 3)
    assert "already invoiced" in message and "only a credit can follow an invoice" in message
    assert f"--hour at or after {period_start:%Y-%m-%dT%H:%M}Z" in message


def test_an_hour_holding_the_period_boundary_is_refused(billing_runtime, billed_twelve):
    boundary = billed_twelve + timedelta(minutes=30)
    set_period(billing_runtime, boundary, boundary + timedelta(days=30))
    assert "holds organization 7's billing period boundary" in refused(
        billing_runtime, billed_twelve, -1
    )


def test_a_key_reused_with_other_values_is_refused(billing_runtime, billed_twelve):
    first = correct(billing_runtime, billed_twelve, -2, key="k-1")
    with pytest.raises(CorrectionError, match="'k-1' was used for correction"):
        correct(billing_runtime, billed_twelve, -3, key="k-1")
    assert recorded(billing_runtime) == 1
    assert correct(billing_runtime, billed_twelve, -2, key="k-1")["id"] == first["id"]


def test_dry_run_records_nothing_and_says_what_would_be_sent(billing_runtime, billed_twelve):
    shown = correct(billing_runtime, billed_twelve, -5, dry_run=True)
    assert recorded(billing_runtime) == 0
    assert (shown["method_as_of_now"], shown["billed_before"], shown["billed_after"]) == (
        "cancel_restate",
        12,
        7,
    )
    (cancel,) = shown["would_send"]["cancel"]
    assert cancel["value"] == 12
    assert shown["would_send"]["meter_event"]["value"] == 7


def test_a_meter_that_does_not_sum_is_refused(make_runtime, billing_settings, emulator):
    runtime = make_runtime(
        billing_settings.replace(stripe_meters={**billing_settings.stripe_meters, "seats": "seats"})
    )
    add_accounts(runtime, [ORG])
    runtime.stripe.client.v1.billing.meters.create(
        {"display_name": "Seats", "event_name": "seats", "default_aggregation": {"formula": "last"}}
    )
    assert "aggregates with 'last'" in refused(runtime, this_hour(1), -1, event_type="seats")
