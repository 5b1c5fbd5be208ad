"""invoice.created: late usage flushed onto the draft, adjustments applied once per invoice."""

from __future__ import annotations

import json
from datetime import UTC
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from billing import logs
from billing.adjustments import invoice
from billing.adjustments import service as adjustments
from billing.models import BillingAdjustment, InvoiceAdjustment, utcnow
from tests.factories import add_accounts, add_events
from tests.fixtures.webhooks import post, rows, standalone_app

ORG = 9


@pytest.fixture
def cli(webhook_runtime):
    runner = standalone_app(webhook_runtime).test_cli_runner()

    def invoke(*args: str):
        return runner.invoke(args=["billing", *args])

    return invoke


def applied_rows(runtime) -> list[tuple]:
    with runtime.session_factory() as session:
        return [
            (row.stripe_invoice_id, row.kind, row.amount_cents, row.status)
            for row in session.scalars(sa.select(InvoiceAdjustment).order_by(InvoiceAdjustment.id))
        ]


def our_items(stripe, invoice_id: str) -> list[tuple[str, int]]:
    return [
        (line.metadata["billing_adjustment_kind"], line.amount)
        for line in stripe.invoice_lines(invoice_id)
        if invoice.KEY_METADATA in (line.metadata or {})
    ]


def metered_subscription(runtime, emulator, hour_start) -> tuple[str, object]:
    """Org 9 on a metered price (1 cent per api_call), its period starting just before this hour
    so usage stamped at the hour's start falls inside it."""
    emulator.control("POST", "clock", {"set": int(hour_start.timestamp()) - 60})
    client = runtime.stripe.client
    customer = add_accounts(runtime, [ORG])[ORG]
    meter = runtime.stripe.meter_by_event_name()["api_call"]
    product = client.v1.products.create({"name": "API"})
    price = client.v1.prices.create(
        {
            "currency": "usd",
            "unit_amount_decimal": "1",
            "product": product.id,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )
    subscription = client.v1.subscriptions.create(
        {"customer": customer, "items": [{"price": price.id}]}
    )
    return customer, subscription


def test_invoice_created_redelivered_applies_adjustments_once_with_late_usage(
    delivering, webhook_runtime, emulator, captured, cli
):
    stripe = webhook_runtime.stripe
    hour_start = utcnow().replace(minute=0, second=0, microsecond=0)
    customer, subscription = metered_subscription(webhook_runtime, emulator, hour_start)
    delivering.settle()  # subscription.created: the account learns its period
    for args in (("minimum_commitment", "5000"), ("credit", "700"), ("credit", "300", "eur")):
        kind, amount, *currency = args
        added = cli(
            "adjustments",
            "add",
            "--org-id",
            str(ORG),
            "--kind",
            kind,
            "--amount-cents",
            amount,
            *(["--currency", currency[0]] if currency else []),
        )
        assert added.exit_code == 0, added.output
    # Usage of the closed period that the hourly flush has not sent yet.
    add_events(
        webhook_runtime,
        [
            {
                "organization_id": ORG,
                "event_type": "api_call",
                "quantity": q,
                "occurred_at": hour_start,
            }
            for q in (500, 400, 300)
        ],
    )

    delivering.configure(duplicate=True)  # every event delivered twice
    period_end = subscription["items"].data[0].current_period_end
    emulator.control("POST", "clock", {"set": period_end + 10})
    delivering.settle()
    (draft,) = stripe.client.v1.invoices.list({"customer": customer, "status": "draft"}).data
    assert draft.billing_reason == "subscription_cycle"
    (created,) = [
        e
        for e in stripe.client.v1.events.list({"type": "invoice.created", "limit": 100}).data
        if e.data.object.id == draft.id
    ]
    # A third delivery of the same event, as Stripe's own retries would make.
    body = json.dumps(created.to_dict(), default=str).encode()  # decimals as Stripe sends them
    assert post(delivering.url, body).json()["outcome"] == "duplicate"
    delivering.settle()

    draft = stripe.retrieve_invoice(draft.id)
    metered = [
        line.amount
        for line in stripe.invoice_lines(draft.id)
        if line.parent.type == "subscription_item_details"
    ]
    assert metered == [1200]  # the late usage is on this invoice's period
    assert sorted(our_items(stripe, draft.id)) == [("credit", -700), ("minimum_commitment", 3800)]
    assert draft.total == 1200 + 3800 - 700
    assert applied_rows(webhook_runtime) == [
        (draft.id, "minimum_commitment", 3800, "applied"),
        (draft.id, "credit", -700, "applied"),
    ]
    (applied,) = captured.messages(logs.INVOICE_ADJUSTMENTS_APPLIED)
    assert (applied.event_id, applied.event_type, applied.invoice_id, applied.organization_id) == (
        created.id,
        "invoice.created",
        draft.id,
        ORG,
    )
    assert (
        applied.metered_usage_cents,
        applied.minimum_commitment_topup_cents,
        applied.credit_cents,
    ) == (1200, 3800, 700)
    assert (
        len([r for r in captured.messages(logs.WEBHOOK_DUPLICATE) if r.event_id == created.id]) == 2
    )
    listed = json.loads(cli("adjustments", "list", "--org-id", str(ORG)).output)["adjustments"]
    pending = {(a["kind"], a["currency"]): a["pending"] for a in listed}
    assert pending == {
        ("minimum_commitment", "usd"): True,
        ("credit", "usd"): False,
        ("credit", "eur"): True,
    }

    # The subscription's first invoice was finalized at once: never adjusted.
    first = [
        i
        for i in stripe.client.v1.invoices.list({"customer": customer}).data
        if i.billing_reason == "subscription_create"
    ]
    assert first and all(our_items(stripe, i.id) == [] for i in first)

    # Finalized an hour later; running the event again changes nothing on it.
    emulator.control("POST", "clock", {"advance": 3700})
    assert stripe.retrieve_invoice(draft.id).status in ("open", "paid")
    replayed = cli("webhooks", "replay", created.id, "--force")
    assert replayed.exit_code == 0, replayed.output
    assert sorted(our_items(stripe, draft.id)) == [("credit", -700), ("minimum_commitment", 3800)]
    assert len(applied_rows(webhook_runtime)) == 2
    assert any(
        "only drafts" in r.reason for r in captured.messages(logs.INVOICE_ADJUSTMENTS_SKIPPED)
    )


@pytest.fixture
def org_account(webhook_runtime) -> str:
    return add_accounts(webhook_runtime, [ORG])[ORG]


def test_usage_above_the_minimum_records_a_zero_top_up_and_adds_no_item(
    webhook_runtime, org_account
):
    adjustments.add_adjustment(webhook_runtime, ORG, "minimum_commitment", 5000, "usd")
    draft = SimpleNamespace(id="in_test", currency="usd")
    pending = invoice.plan_adjustments(webhook_runtime, ORG, draft, usage_cents=6100)
    assert pending == []
    assert applied_rows(webhook_runtime) == [("in_test", "minimum_commitment", 0, "applied")]
    # Planned once: a second run for the same invoice plans nothing new, whatever usage says now.
    invoice.plan_adjustments(webhook_runtime, ORG, draft, usage_cents=10)
    assert applied_rows(webhook_runtime) == [("in_test", "minimum_commitment", 0, "applied")]


def test_a_credit_goes_on_one_invoice_only(webhook_runtime, org_account):
    adjustments.add_adjustment(webhook_runtime, ORG, "credit", 700, "usd")
    first = invoice.plan_adjustments(
        webhook_runtime, ORG, SimpleNamespace(id="in_a", currency="usd"), usage_cents=0
    )
    second = invoice.plan_adjustments(
        webhook_runtime, ORG, SimpleNamespace(id="in_b", currency="usd"), usage_cents=0
    )
    assert [(r.stripe_invoice_id, r.amount_cents) for r in first] == [("in_a", -700)]
    assert second == []


class TestAdjustmentsCommands:
    @pytest.fixture(autouse=True)
    def org_3(self, webhook_runtime):
        add_accounts(webhook_runtime, [3])

    def test_add_list_remove(self, cli, webhook_runtime):
        added = json.loads(
            cli(
                "adjustments",
                "add",
                "--org-id",
                "3",
                "--kind",
                "credit",
                "--amount-cents",
                "250",
                "--currency",
                "EUR",
            ).output
        )
        assert (added["kind"], added["amount_cents"], added["currency"]) == ("credit", 250, "eur")
        listed = json.loads(cli("adjustments", "list").output)
        assert [a["id"] for a in listed["adjustments"]] == [added["id"]]
        removed = cli("adjustments", "remove", "--org-id", "3", "--kind", "credit")
        assert removed.exit_code == 0 and json.loads(removed.output)["removed"] == [added["id"]]
        assert json.loads(cli("adjustments", "list").output)["count"] == 0
        assert json.loads(cli("adjustments", "list", "--all").output)["count"] == 1

    def test_a_second_minimum_for_the_same_currency_is_refused(self, cli):
        args = (
            "adjustments",
            "add",
            "--org-id",
            "3",
            "--kind",
            "minimum_commitment",
            "--amount-cents",
            "100",
        )
        assert cli(*args).exit_code == 0
        again = cli(*args)
        assert again.exit_code == 1 and "already has a usd minimum commitment" in again.output

    @pytest.mark.parametrize(
        ("args", "code"),
        [
            (("--kind", "credit", "--amount-cents", "0"), 2),
            (("--kind", "refund", "--amount-cents", "5"), 2),
            (("--kind", "credit", "--amount-cents", "5", "--currency", "dollars"), 1),
            (("--kind", "credit", "--amount-cents", "5", "--currency", "XYZ"), 1),
            (("--kind", "credit", "--amount-cents", "100000000"), 1),
            (("--org-id", "77777", "--kind", "credit", "--amount-cents", "5"), 1),
        ],
    )
    def test_bad_input_exits_non_zero_and_stores_nothing(self, cli, webhook_runtime, args, code):
        org = () if "--org-id" in args else ("--org-id", "3")
        result = cli("adjustments", "add", *org, *args)
        assert result.exit_code == code, result.output
        assert len(result.output.strip().splitlines()) == 1 or code == 2
        with webhook_runtime.session_factory() as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(BillingAdjustment)) == 0

    def test_a_spent_credit_cannot_be_removed(self, cli, webhook_runtime):
        credit = adjustments.add_adjustment(webhook_runtime, 3, "credit", 500, "usd")
        invoice.plan_adjustments(
            webhook_runtime, 3, SimpleNamespace(id="in_x", currency="usd"), usage_cents=0
        )
        refused = cli("adjustments", "remove", "--id", str(credit["id"]))
        assert refused.exit_code == 1 and "already applied to in_x" in refused.output

    def test_remove_needs_a_target(self, cli):
        assert cli("adjustments", "remove").exit_code == 2


def test_usage_for_the_minimum_counts_what_the_outbox_sent_when_stripe_lags(webhook_runtime):
    """Real Stripe aggregates meter events asynchronously: a draft read right after the flush
    may not show them yet. The top-up must not charge for usage the customer already has."""
    from datetime import datetime, timedelta

    from billing.models import UsageSubmission

    client = webhook_runtime.stripe.client
    meter = webhook_runtime.stripe.meter_by_event_name()["api_call"]
    product = client.v1.products.create({"name": "API"})
    price = client.v1.prices.create(
        {
            "currency": "usd",
            "unit_amount_decimal": "1.5",
            "product": product.id,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )
    start = datetime(2026, 10, 1, tzinfo=UTC)
    end = datetime(2026, 11, 1, tzinfo=UTC)
    with webhook_runtime.session_factory.begin() as session:
        for n, (hour, status) in enumerate(
            [(start, "sent"), (start + timedelta(days=3), "sent"), (end, "sent"), (start, "failed")]
        ):
            session.add(
                UsageSubmission(
                    organization_id=ORG,
                    stripe_customer_id="cus_x",
                    event_type="api_call",
                    event_name="api_call",
                    value=1000,
                    event_count=1,
                    window_start=hour,
                    window_end=hour + timedelta(hours=1),
                    identifier=f"id-{n}",
                    status=status,
                )
            )
    lagging_line = {
        "amount": 0,
        "parent": {"type": "subscription_item_details"},
        "pricing": {"price_details": {"price": price.id}},
        "period": {"start": int(start.timestamp()), "end": int(end.timestamp())},
    }
    # 2,000 units sent inside the period (not the next period's, not the failed one) x 1.5 cents.
    assert invoice.metered_usage_cents(webhook_runtime, ORG, [lagging_line]) == 3000
    caught_up = {**lagging_line, "amount": 3100}  # Stripe may know more (usage sent elsewhere)
    assert invoice.metered_usage_cents(webhook_runtime, ORG, [caught_up]) == 3100


def missed_top_ups(runtime) -> list[InvoiceAdjustment]:
    with runtime.session_factory() as session:
        return list(
            session.scalars(
                sa.select(InvoiceAdjustment)
                .where(
                    InvoiceAdjustment.status == "missed",
                    InvoiceAdjustment.kind == "minimum_commitment",
                )
                .order_by(InvoiceAdjustment.id)
            )
        )


class TestInvoiceFinalizedBeforeProcessing:
    """Workers down or backlogged at renewal: invoice.created is processed after Stripe finalized
    the draft. The minimum commitment must not vanish: a `missed` row, a gauge and an alert, and
    an operator carries it over to the next invoice or waives it."""

    @pytest.fixture
    def renewed(self, delivering, webhook_runtime, emulator, cli):
        hour_start = utcnow().replace(minute=0, second=0, microsecond=0)
        customer, subscription = metered_subscription(webhook_runtime, emulator, hour_start)
        delivering.settle()
        for kind, amount in (("minimum_commitment", "5000000"), ("credit", "700")):
            added = cli(
                "adjustments", "add", "--org-id", str(ORG), "--kind", kind, "--amount-cents", amount
            )
            assert added.exit_code == 0, added.output
        add_events(
            webhook_runtime,
            [
                {
                    "organization_id": ORG,
                    "event_type": "api_call",
                    "quantity": 1200,
                    "occurred_at": hour_start,
                },
            ],
        )
        period_end = subscription["items"].data[0].current_period_end
        # One step past the period's end and the finalization hour: the draft is finalized
        # before the worker sees invoice.created.
        emulator.control("POST", "clock", {"set": period_end + 3600 + 60})
        delivering.settle()
        (invoice,) = [
            i
            for i in webhook_runtime.stripe.client.v1.invoices.list({"customer": customer}).data
            if i.billing_reason == "subscription_cycle"
        ]
        assert invoice.status in ("open", "paid")
        return SimpleNamespace(customer=customer, invoice=invoice, period_end=period_end)

    def test_the_top_up_is_recorded_missed_and_visible(
        self, captured, renewed, webhook_runtime, cli
    ):
        from billing.ops.state import read_state

        stripe = webhook_runtime.stripe
        assert our_items(stripe, renewed.invoice.id) == []
        (missed,) = missed_top_ups(webhook_runtime)
        # 5,000,000 minus the 1,200 cents of usage the late-usage flush sent for the period.
        assert (
            missed.stripe_invoice_id,
            missed.kind,
            missed.amount_cents,
            missed.metered_usage_cents,
        ) == (renewed.invoice.id, "minimum_commitment", 5_000_000 - 1200, 1200)
        credit = [
            r for r in captured.messages(logs.INVOICE_ADJUSTMENT_MISSED) if r.kind == "credit"
        ]
        assert credit, "the credit that missed the invoice is logged too"
        listed = json.loads(cli("adjustments", "list", "--missed").output)["adjustments"]
        assert [(a["kind"], [x["status"] for x in a["applied"]]) for a in listed] == [
            ("minimum_commitment", ["missed"]),
            ("credit", ["missed"]),
        ]
        pending = {a["kind"]: a["pending"] for a in listed}
        assert pending["credit"] is True  # it goes on the next invoice by itself
        assert read_state(webhook_runtime).missed_adjustments == 1
        assert any(
            r.amount_cents == 5_000_000 - 1200
            for r in captured.messages(logs.INVOICE_ADJUSTMENT_MISSED)
        )

    def test_carry_over_bills_it_on_the_next_invoice_once(
        self, renewed, webhook_runtime, emulator, delivering, cli
    ):
        from billing.ops.state import read_state

        (missed,) = missed_top_ups(webhook_runtime)
        carried = cli("adjustments", "carry-over", str(missed.id), "--actor", "ops-anna")
        assert carried.exit_code == 0, carried.output
        shown = json.loads(carried.stdout)
        assert (shown["status"], shown["resolved_by"]) == ("carried_over", "ops-anna")
        again = cli("adjustments", "carry-over", str(missed.id))
        assert again.exit_code == 1 and "is carried_over, not missed" in again.output
        assert read_state(webhook_runtime).missed_adjustments == 0
        pending = webhook_runtime.stripe.client.v1.invoice_items.list(
            {"customer": renewed.customer, "pending": True}
        ).data
        assert [(i.amount, i.id) for i in pending] == [(5_000_000 - 1200, shown["invoice_item_id"])]
        # The next period's invoice carries it, and the credit that missed the first one.
        emulator.control("POST", "clock", {"set": renewed.period_end + 31 * 86400 + 60})
        delivering.settle()
        latest = max(
            (
                i
                for i in webhook_runtime.stripe.client.v1.invoices.list(
                    {"customer": renewed.customer}
                ).data
                if i.billing_reason == "subscription_cycle"
            ),
            key=lambda i: i.created,
        )
        amounts = sorted(
            line.amount
            for line in webhook_runtime.stripe.invoice_lines(latest.id)
            if line.parent.type == "invoice_item_details"
        )
        assert 5_000_000 - 1200 in amounts and -700 in amounts

    def test_waive_needs_a_reason_and_keeps_it(self, renewed, webhook_runtime, cli):
        (missed,) = missed_top_ups(webhook_runtime)
        assert cli("adjustments", "waive", str(missed.id)).exit_code == 2
        blank = cli("adjustments", "waive", str(missed.id), "--reason", " ")
        assert blank.exit_code == 1 and "needs a reason" in blank.output
        waived = cli(
            "adjustments",
            "waive",
            str(missed.id),
            "--reason",
            "outage goodwill",
            "--actor",
            "ops-ben",
        )
        assert waived.exit_code == 0, waived.output
        with webhook_runtime.session_factory() as session:
            row = session.get(InvoiceAdjustment, missed.id)
            assert (row.status, row.resolved_by, row.resolution_note) == (
                "waived",
                "ops-ben",
                "outage goodwill",
            )
        assert (
            webhook_runtime.stripe.client.v1.invoice_items.list(
                {"customer": renewed.customer, "pending": True}
            ).data
            == []
        )

    def test_a_missed_credit_is_not_carried_over_by_hand(self, renewed, webhook_runtime, cli):
        with webhook_runtime.session_factory() as session:
            credit_row = session.scalar(
                sa.select(InvoiceAdjustment.id).where(InvoiceAdjustment.kind == "credit")
            )
        refused = cli("adjustments", "carry-over", str(credit_row))
        assert refused.exit_code == 1 and "goes on the next invoice by itself" in refused.output


def test_a_draft_deleted_before_invoice_created_is_processed_is_ignored_with_the_reason(
    delivering, webhook_runtime, org_account, captured, cli
):
    # The delivery waits while the draft is deleted (a one-off draft: Stripe deletes only those).
    delivering.configure(hold_ms=1500)
    client = webhook_runtime.stripe.client
    draft = client.v1.invoices.create({"customer": org_account, "auto_advance": False})
    assert client.v1.invoices.delete(draft.id).deleted
    done = delivering.settle()
    created = next(r for r in rows(webhook_runtime) if r.type == "invoice.created")
    assert done[created.stripe_event_id] == "ignored"
    assert f"invoice {draft.id} no longer exists" in created.last_error
    (skipped,) = captured.messages(logs.INVOICE_ADJUSTMENTS_SKIPPED)
    assert skipped.invoice_id == draft.id and "no longer exists" in skipped.reason
    ignored = [
        r
        for r in captured.messages(logs.WEBHOOK_EVENT_IGNORED)
        if r.event_id == created.stripe_event_id
    ]
    assert len(ignored) == 1 and ignored[0].reason == created.last_error
    assert not captured.messages(logs.WEBHOOK_PROCESSING_FAILED)
    listed = cli("webhooks", "list", "--status", "ignored", "--type", "invoice.created")
    assert listed.exit_code == 0, listed.output
    assert [e["last_error"] for e in json.loads(listed.stdout)["events"]] == [created.last_error]
