"""Clock-driven renewals, invoices, invoice items, checkout and entitlements."""

from __future__ import annotations

import pytest
import stripe


def types_since(client, since_id=None):
    """Event types, oldest first, after event `since_id`."""
    events = list(client.v1.events.list({"limit": 100}).auto_paging_iter())
    ids = [e.id for e in events]
    if since_id:
        events = events[: ids.index(since_id)]
    return [e.type for e in reversed(events)]


def usage(client, customer, value, timestamp):
    client.v1.billing.meter_events.create(
        {
            "event_name": "api_calls",
            "timestamp": timestamp,
            "payload": {"stripe_customer_id": customer, "value": str(value)},
        }
    )


def test_period_end_drafts_invoice_rolls_period_then_finalizes(stripe_client, metered, emulator):
    client, cus = stripe_client, metered.customer.id
    item = metered.subscription["items"].data[0]
    start, end = item.current_period_start, item.current_period_end
    usage(client, cus, 300, emulator.now())
    marker = client.v1.events.list({"limit": 1}).data[0].id

    emulator.advance(end - emulator.now() + 10)  # just past period end

    sub = client.v1.subscriptions.retrieve(metered.subscription.id)
    rolled = sub["items"].data[0]
    assert rolled.current_period_start == end and rolled.current_period_end > end
    drafts = client.v1.invoices.list({"subscription": sub.id, "status": "draft"}).data
    assert len(drafts) == 1
    inv = drafts[0]
    assert inv.id == sub.latest_invoice
    assert inv.billing_reason == "subscription_cycle"
    assert inv.parent.subscription_details.subscription == sub.id
    assert (inv.period_start, inv.period_end) == (start, end)
    assert inv.automatically_finalizes_at == end + 3600
    line = inv.lines.data[0]
    assert line.quantity == 300 and line.amount == 150  # 300 units at 0.5 cent
    assert line.parent.subscription_item_details.subscription_item == item.id
    assert types_since(client, marker) == ["invoice.created", "customer.subscription.updated"]
    created = client.v1.events.list({"type": "invoice.created", "limit": 1}).data[0]
    assert created.data.object.id == inv.id and created.data.object.status == "draft"

    # Within the grace period: late usage for the closed period and an invoice item still land.
    usage(client, cus, 100, end - 60)
    ii = client.v1.invoice_items.create(
        {
            "customer": cus,
            "invoice": inv.id,
            "amount": 500,
            "currency": "usd",
            "description": "Setup fee",
        }
    )
    assert ii.invoice == inv.id
    inv = client.v1.invoices.retrieve(inv.id)
    assert inv.status == "draft" and inv.total == 200 + 500

    marker = client.v1.events.list({"limit": 1}).data[0].id
    emulator.advance(3600)
    inv = client.v1.invoices.retrieve(inv.id)
    assert inv.status == "paid" and inv.number and inv.amount_paid == 700
    assert types_since(client, marker)[:2] == ["invoice.finalized", "invoice.paid"]
    finalized = client.v1.events.list({"type": "invoice.finalized", "limit": 1}).data[0]
    assert finalized.data.object.status == "open"

    with pytest.raises(stripe.InvalidRequestError, match="draft"):
        client.v1.invoice_items.create(
            {"customer": cus, "invoice": inv.id, "amount": 100, "currency": "usd"}
        )


def test_finalized_invoice_stays_open_without_auto_pay(stripe_client, metered, emulator):
    emulator.post("settings", {"invoice_auto_pay": False, "finalize_delay": 60})
    end = metered.subscription["items"].data[0].current_period_end
    usage(stripe_client, metered.customer.id, 10, emulator.now())
    emulator.advance(end - emulator.now() + 61)
    inv = stripe_client.v1.invoices.list({"customer": metered.customer.id, "limit": 1}).data[0]
    assert inv.status == "open" and inv.amount_due == 5
    paid = stripe_client.v1.invoices.pay(inv.id, {"paid_out_of_band": True})
    assert paid.status == "paid"


def test_cancel_emits_deleted_and_drops_entitlements(stripe_client, metered, emulator):
    feat = stripe_client.v1.entitlements.features.create({"name": "API", "lookup_key": "api"})
    stripe_client.v1.products.features.create(metered.product.id, {"entitlement_feature": feat.id})
    active = stripe_client.v1.entitlements.active_entitlements.list(
        {"customer": metered.customer.id}
    )
    assert [e.lookup_key for e in active.data] == ["api"]
    sub = stripe_client.v1.subscriptions.cancel(metered.subscription.id)
    assert sub.status == "canceled" and sub.ended_at
    assert not stripe_client.v1.entitlements.active_entitlements.list(
        {"customer": metered.customer.id}
    ).data
    kinds = types_since(stripe_client)
    assert kinds.count("entitlements.active_entitlement_summary.updated") == 2
    assert kinds[-2:] == [
        "customer.subscription.deleted",
        "entitlements.active_entitlement_summary.updated",
    ]


def test_checkout_completion(stripe_client, emulator):
    feat = stripe_client.v1.entitlements.features.create(
        {"name": "Pro seats", "lookup_key": "pro-seats"}
    )
    price = stripe_client.v1.prices.create(
        {
            "currency": "usd",
            "unit_amount": 2000,
            "product_data": {"name": "Pro"},
            "recurring": {"interval": "month"},
        }
    )
    stripe_client.v1.products.features.create(price.product, {"entitlement_feature": feat.id})
    with pytest.raises(stripe.InvalidRequestError, match="Received unknown parameter"):
        stripe_client.v1.entitlements.features.create(
            {"name": "x", "lookup_key": "x", "lookupkey": "y"}
        )

    session = stripe_client.v1.checkout.sessions.create(
        {
            "mode": "subscription",
            "line_items": [{"price": price.id, "quantity": 1}],
            "client_reference_id": "org_42",
            "customer_email": "new@example.com",
            "success_url": "https://app.example/ok?s={CHECKOUT_SESSION_ID}",
            "cancel_url": "https://app.example/cancel",
        }
    )
    assert session.id.startswith("cs_") and session.status == "open"
    assert session.url.endswith(session.id)

    emulator.post(f"checkout_sessions/{session.id}/complete")

    done = stripe_client.v1.checkout.sessions.retrieve(session.id)
    assert done.status == "complete" and done.payment_status == "paid"
    assert done.client_reference_id == "org_42"
    sub = stripe_client.v1.subscriptions.retrieve(done.subscription)
    assert sub.customer == done.customer and sub.status == "active"
    customer = stripe_client.v1.customers.retrieve(done.customer)
    assert customer.email == "new@example.com"
    active = stripe_client.v1.entitlements.active_entitlements.list({"customer": done.customer})
    assert [e.lookup_key for e in active.data] == ["pro-seats"]
    kinds = types_since(stripe_client)
    for expected in (
        "customer.created",
        "customer.subscription.created",
        "checkout.session.completed",
        "entitlements.active_entitlement_summary.updated",
    ):
        assert expected in kinds
    completed = stripe_client.v1.events.list({"type": "checkout.session.completed"}).data[0]
    assert completed.data.object.client_reference_id == "org_42"
    summary = stripe_client.v1.events.list(
        {"type": "entitlements.active_entitlement_summary.updated"}
    ).data[0]
    assert summary.data.object.customer == done.customer
    assert stripe_client.v1.events.retrieve(summary.id).type == summary.type

    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.checkout.sessions.expire(session.id)


def test_lookup_key_is_unique(stripe_client, emulator):
    stripe_client.v1.entitlements.features.create({"name": "A", "lookup_key": "a"})
    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        stripe_client.v1.entitlements.features.create({"name": "B", "lookup_key": "a"})
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.entitlements.features.create({"name": "C", "lookup_key": "x" * 81})


def test_cancel_at_period_end_bills_usage_then_ends(stripe_client, metered, emulator):
    sub = stripe_client.v1.subscriptions.update(
        metered.subscription.id, {"cancel_at_period_end": True}
    )
    end = sub["items"].data[0].current_period_end
    assert sub.cancel_at == end and sub.status == "active"
    usage(stripe_client, metered.customer.id, 40, emulator.now())
    emulator.advance(end - emulator.now() + 1)
    sub = stripe_client.v1.subscriptions.retrieve(sub.id)
    assert sub.status == "canceled" and sub.ended_at == end
    final = stripe_client.v1.invoices.retrieve(sub.latest_invoice)
    assert final.status == "draft" and final.total == 20
    assert [line.quantity for line in final.lines.data] == [40]
    assert stripe_client.v1.subscriptions.list({"customer": metered.customer.id}).data == []


def test_update_adds_an_item(stripe_client, metered):
    seats = stripe_client.v1.prices.create(
        {
            "currency": "usd",
            "unit_amount": 1000,
            "product": metered.product.id,
            "recurring": {"interval": "month"},
        }
    )
    sub = stripe_client.v1.subscriptions.update(
        metered.subscription.id, {"items": [{"price": seats.id, "quantity": 3}]}
    )
    items = sub["items"].data
    assert [i.price.id for i in items] == [metered.price.id, seats.id]
    assert items[1].quantity == 3
    assert items[1].current_period_end == items[0].current_period_end
    yearly = stripe_client.v1.prices.create(
        {
            "currency": "usd",
            "unit_amount": 1000,
            "product": metered.product.id,
            "recurring": {"interval": "year"},
        }
    )
    with pytest.raises(stripe.InvalidRequestError, match="interval"):
        stripe_client.v1.subscriptions.update(
            metered.subscription.id, {"items": [{"price": yearly.id}]}
        )
