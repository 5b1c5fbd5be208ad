"""`stripe_gateway.translate_error`, the one place that decides what a Stripe error means."""

from __future__ import annotations

import pytest
import stripe

from billing.stripe_gateway import ErrorScope, translate_error


def _invalid(message: str, *, param: str | None = None, code: str | None = None, status=400):
    body = {
        "error": {"type": "invalid_request_error", "message": message, "param": param, "code": code}
    }
    return stripe.InvalidRequestError(message, param, code=code, http_status=status, json_body=body)


@pytest.mark.parametrize(
    ("error", "scope"),
    [
        (stripe.AuthenticationError("Invalid API Key provided", http_status=401), ErrorScope.RUN),
        (
            stripe.PermissionError("The key lacks billing.meter_event write", http_status=403),
            ErrorScope.RUN,
        ),
        (_invalid("This API key expired.", code="api_key_expired"), ErrorScope.RUN),
        (
            _invalid(
                "No active meter was found for event_name `typo`.",
                param="event_name",
                code="resource_missing",
            ),
            ErrorScope.METER,
        ),
        (_invalid("The meter is archived.", code="archived_meter"), ErrorScope.METER),
        (
            _invalid(
                "No such customer: 'cus_x'",
                param="payload[stripe_customer_id]",
                code="resource_missing",
            ),
            ErrorScope.CUSTOMER,
        ),
        (
            _invalid("Customer not found.", code="meter_event_customer_not_found"),
            ErrorScope.CUSTOMER,
        ),
        (
            _invalid(
                "Timestamp must be within the past 35 days.",
                param="timestamp",
                code="timestamp_too_far_in_past",
            ),
            ErrorScope.ROW,
        ),
        (_invalid("Invalid payload[value]", param="payload[value]"), ErrorScope.ROW),
    ],
)
def test_permanent_errors_get_the_scope_they_are_about(error, scope):
    translated = translate_error(error)
    assert not translated.transient and translated.scope is scope


@pytest.mark.parametrize(
    "error",
    [
        stripe.RateLimitError("Too many requests", http_status=429),
        stripe.APIConnectionError("connection reset"),
        stripe.APIError("internal", http_status=500),
        _invalid("Key in use by another request", status=409),
    ],
)
def test_transient_errors_are_retried_not_scoped(error):
    translated = translate_error(error)
    assert translated.transient and translated.scope is ErrorScope.ROW


class TestMeterEventSessionHolder:
    """The v2 session's token: renewed within the margin of its expiry, once per stale token."""

    def holder(self, lifetime: float):
        from datetime import UTC, datetime, timedelta

        from billing.stripe_gateway import MeterEventSessionHolder

        clock = [1_000.0]
        made: list[str] = []

        def create():
            made.append(f"tok{len(made)}")
            start = datetime.fromtimestamp(clock[0], UTC)
            return made[-1], start, start + timedelta(seconds=lifetime)

        return MeterEventSessionHolder(create, clock=lambda: clock[0]), clock, made

    @pytest.mark.parametrize(("lifetime", "margin"), [(900, 60), (3, 0.6)])
    def test_renewed_at_the_margin_before_expiry(self, lifetime, margin):
        holder, clock, _ = self.holder(lifetime)
        assert holder.token() == "tok0"
        clock[0] += lifetime - margin - 0.01
        assert holder.token() == "tok0"
        clock[0] += 0.02
        assert holder.token() == "tok1" and holder.renewals == 2

    def test_a_stale_token_is_renewed_once_for_every_thread(self):
        holder, _, made = self.holder(900)
        stale = holder.token()
        assert holder.renew(stale) == "tok1"
        assert holder.renew(stale) == "tok1"  # a second lane with the same 401
        assert made == ["tok0", "tok1"]


def test_cancel_meter_event_answers_stripe_s_status_and_refusals_are_permanent(
    billing_runtime, emulator
):
    from billing.models import utcnow
    from billing.stripe_gateway import MeterEvent, PermanentStripeError
    from tests.factories import add_accounts

    gateway = billing_runtime.stripe
    customer = add_accounts(billing_runtime, [1])[1]
    gateway.send_meter_event(MeterEvent("api_call", customer, 4, utcnow(), "id-1", "key-1"))
    assert gateway.cancel_meter_event("api_call", "id-1", "cancel-1") == "pending"
    assert gateway.cancel_meter_event("api_call", "id-1", "cancel-1") == "pending"  # replayed
    assert emulator.billed()[customer]["api_call"] == 0
    with pytest.raises(PermanentStripeError) as refused:
        gateway.cancel_meter_event("api_call", "never-sent", "cancel-2")
    assert refused.value.status == 400 and refused.value.scope is ErrorScope.ROW


def test_subscription_item_price_finds_the_meter_s_price(billing_runtime, emulator):
    from tests.factories import add_accounts

    gateway = billing_runtime.stripe
    client = gateway.client
    customer = add_accounts(billing_runtime, [1])[1]
    meters = gateway.meter_by_event_name()
    prices = {}
    for name in ("api_call", "storage_gb_hour"):
        prices[name] = client.v1.prices.create(
            {
                "currency": "usd",
                "unit_amount_decimal": "2.5",
                "product_data": {"name": name},
                "recurring": {
                    "interval": "month",
                    "usage_type": "metered",
                    "meter": meters[name].id,
                },
            }
        )
    subscription = client.v1.subscriptions.create(
        {"customer": customer, "items": [{"price": prices["api_call"].id}]}
    )
    found = gateway.subscription_item_price(subscription.id, meters["api_call"].id)
    assert found is not None and found.id == prices["api_call"].id
    assert gateway.subscription_item_price(subscription.id, meters["storage_gb_hour"].id) is None
