"""One-off draft invoices: create (`POST /v1/invoices`), delete (`DELETE /v1/invoices/{id}`), and
what a deleted draft answers afterwards. Through stripe-python over HTTP."""

from __future__ import annotations

import json

import pytest
import stripe


def test_one_off_draft_is_created_announced_and_does_not_auto_advance(
    stripe_client, metered, emulator, webhook_receiver
):
    client, cus = stripe_client, metered.customer.id
    pending = client.v1.invoice_items.create({"customer": cus, "amount": 700, "currency": "usd"})
    inv = client.v1.invoices.create(
        {"customer": cus, "description": "Setup fee", "metadata": {"org": "7"}}
    )
    assert inv.id.startswith("in_") and inv.object == "invoice"
    assert (inv.status, inv.billing_reason, inv.parent) == ("draft", "manual", None)
    assert (inv.auto_advance, inv.automatically_finalizes_at) == (False, None)
    assert (inv.description, inv.metadata.to_dict(), inv.currency) == (
        "Setup fee",
        {"org": "7"},
        "usd",
    )
    assert inv.lines.data == [] and inv.amount_due == 0  # pending items excluded by default
    assert client.v1.invoice_items.retrieve(pending.id).invoice is None

    webhook_receiver.wait_for(2)
    created = [e for e in webhook_receiver.events() if e["type"] == "invoice.created"]
    assert [e["data"]["object"]["id"] for e in created][-1] == inv.id

    emulator.advance(2 * 3600)  # no automatic finalization without auto_advance
    assert client.v1.invoices.retrieve(inv.id).status == "draft"
    client.v1.invoice_items.create(
        {"customer": cus, "invoice": inv.id, "amount": 250, "currency": "usd"}
    )
    assert client.v1.invoices.retrieve(inv.id).amount_due == 250


def test_include_pending_items_and_auto_advance(stripe_client, metered, emulator):
    client, cus = stripe_client, metered.customer.id
    client.v1.invoice_items.create({"customer": cus, "amount": 700, "currency": "usd"})
    inv = client.v1.invoices.create(
        {"customer": cus, "auto_advance": True, "pending_invoice_items_behavior": "include"}
    )
    assert inv.amount_due == 700 and inv.automatically_finalizes_at == inv.created + 3600
    emulator.advance(3600 + 1)
    assert client.v1.invoices.retrieve(inv.id).status == "paid"  # auto-pay is on by default


def test_delete_one_off_draft_then_404(stripe_client, metered, emulator, webhook_receiver):
    client, cus = stripe_client, metered.customer.id
    inv = client.v1.invoices.create({"customer": cus})
    item = client.v1.invoice_items.create(
        {"customer": cus, "invoice": inv.id, "amount": 5, "currency": "usd"}
    )
    deleted = client.v1.invoices.delete(inv.id)
    assert deleted.to_dict() == {"id": inv.id, "object": "invoice", "deleted": True}
    with pytest.raises(stripe.InvalidRequestError) as gone:
        client.v1.invoices.retrieve(inv.id)
    assert gone.value.http_status == 404 and gone.value.code == "resource_missing"
    assert f"No such invoice: '{inv.id}'" in gone.value.user_message
    with pytest.raises(stripe.InvalidRequestError) as again:
        client.v1.invoices.delete(inv.id)
    assert again.value.http_status == 404
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoice_items.retrieve(item.id)
    assert inv.id not in [i.id for i in client.v1.invoices.list({"customer": cus}).data]
    webhook_receiver.wait_for(3)
    types = [e["type"] for e in webhook_receiver.events()]
    assert types.index("invoice.deleted") > types.index("invoice.created")


def test_subscription_and_finalized_invoices_cannot_be_deleted(stripe_client, metered, emulator):
    client = stripe_client
    item = metered.subscription["items"].data[0]
    emulator.advance(item.current_period_end - emulator.now() + 10)
    (draft,) = client.v1.invoices.list(
        {"subscription": metered.subscription.id, "status": "draft"}
    ).data
    with pytest.raises(stripe.InvalidRequestError, match="subscription"):
        client.v1.invoices.delete(draft.id)
    assert client.v1.invoices.retrieve(draft.id).status == "draft"
    one_off = client.v1.invoices.create({"customer": metered.customer.id})
    client.v1.invoices.finalize_invoice(one_off.id)
    with pytest.raises(stripe.InvalidRequestError, match="draft"):
        client.v1.invoices.delete(one_off.id)


def test_a_held_invoice_created_for_a_deleted_draft_names_a_404(
    stripe_client, metered, emulator, webhook_receiver
):
    """What the product sees when the draft was deleted before its event was processed."""
    emulator.post("webhooks", {"hold_ms": 300, "enabled_events": ["invoice.created"]})
    inv = stripe_client.v1.invoices.create({"customer": metered.customer.id})
    stripe_client.v1.invoices.delete(inv.id)
    ((_, body),) = webhook_receiver.wait_for(1)
    event = json.loads(body)
    assert event["data"]["object"]["id"] == inv.id
    with pytest.raises(stripe.InvalidRequestError) as gone:
        stripe_client.v1.invoices.retrieve(event["data"]["object"]["id"])
    assert gone.value.http_status == 404
