"""Usage corrections applied by the flush, against the emulator over HTTP and real PostgreSQL:
each age's method, exactly once, whatever crashes; Stripe's totals after a correction equal the
billable events' sums plus the corrections."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from billing import logs
from billing.models import (
    BillableEventCorrection,
    UsageCorrection,
    UsageCorrectionCancel,
    UsageSubmission,
    utcnow,
)
from billing.stripe_gateway import StripeGateway
from billing.usage import correcting
from billing.usage.corrections import CorrectionError, CorrectionRequest, record_correction
from billing.usage.service import flush_pass
from tests.factories import add_accounts, add_events
from tests.process import FlushChild, billing_env

ORG = 7
HOUR = timedelta(hours=1)


def this_hour(back: int = 0) -> datetime:
    return utcnow().replace(minute=0, second=0, microsecond=0) - back * HOUR


def usage(runtime, hour: datetime, *quantities: int, org: int = ORG, event_type="api_call"):
    add_events(
        runtime,
        [
            {
                "organization_id": org,
                "event_type": event_type,
                "quantity": q,
                "occurred_at": hour + timedelta(minutes=5 + i),
            }
            for i, q in enumerate(quantities)
        ],
    )


def correct(runtime, hour: datetime, delta: int, *, org: int = ORG, key: str | None = None, **kw):
    request = CorrectionRequest(
        organization_id=org,
        event_type=kw.pop("event_type", "api_call"),
        hour=hour,
        delta=delta,
        reason=kw.pop("reason", "double-counted by a retried job"),
        actor="test",
        idempotency_key=key,
    )
    return record_correction(runtime, request, **kw)


def hourly(runtime, customer: str, start: datetime, end: datetime) -> dict[datetime, int]:
    meter = runtime.stripe.meter_by_event_name()["api_call"]
    return runtime.stripe.meter_hourly_totals(meter.id, customer, start, end)


def rows(runtime) -> list[UsageSubmission]:
    with runtime.session_factory() as session:
        return list(session.scalars(sa.select(UsageSubmission).order_by(UsageSubmission.id)))


def corrections(runtime) -> list[UsageCorrection]:
    with runtime.session_factory() as session:
        return list(session.scalars(sa.select(UsageCorrection).order_by(UsageCorrection.id)))


def applied_count(method: str) -> float:
    value = REGISTRY.get_sample_value("billing_usage_corrections_applied_total", {"method": method})
    return value or 0.0


def test_recent_hour_is_cancelled_and_restated_under_a_new_identifier(
    billing_runtime, emulator, captured
):
    customer = add_accounts(billing_runtime, [ORG])[ORG]
    hour = this_hour(2)
    usage(billing_runtime, hour, 5, 7)
    assert flush_pass(billing_runtime).ok
    assert emulator.billed()[customer]["api_call"] == 12
    (original,) = rows(billing_runtime)
    before = applied_count("cancel_restate")

    shown = correct(billing_runtime, hour, -5)
    assert (shown["status"], shown["billed_before"], shown["already_recorded"]) == (
        "requested",
        12,
        False,
    )
    assert shown["method_as_of_now"] == "cancel_restate"
    result = flush_pass(billing_runtime)

    assert result.ok and result.corrections_applied == 1 and result.corrections_waiting == 0
    assert emulator.billed()[customer]["api_call"] == 7
    assert emulator.stats()["meter_events"]["canceled"] == 1
    assert hourly(billing_runtime, customer, hour, hour + HOUR) == {hour: 7}
    cancelled, restated = rows(billing_runtime)
    assert (cancelled.id, cancelled.status) == (original.id, "cancelled")
    assert (restated.status, restated.value, restated.window_start) == ("sent", 7, hour)
    assert restated.identifier != original.identifier
    (done,) = corrections(billing_runtime)
    assert (done.status, done.method, done.submission_id) == (
        "applied",
        "cancel_restate",
        restated.id,
    )
    (line,) = captured.messages(logs.USAGE_CORRECTION_APPLIED)
    assert (line.organization_id, line.event_type, line.hour, line.delta, line.method) == (
        ORG,
        "api_call",
        hour.isoformat(),
        -5,
        "cancel_restate",
    )
    assert applied_count("cancel_restate") == before + 1
    # Applied once: more flushes send and cancel nothing.
    assert flush_pass(billing_runtime).corrections_applied == 0
    assert emulator.stats()["meter_events"]["canceled"] == 1
    assert emulator.billed()[customer]["api_call"] == 7


def test_same_key_twice_records_and_applies_once(billing_runtime, emulator):
    customer = add_accounts(billing_runtime, [ORG])[ORG]
    hour = this_hour(1)
    usage(billing_runtime, hour, 10)
    flush_pass(billing_runtime)

    first = correct(billing_runtime, hour, -4, key="ticket-4711")
    again = correct(billing_runtime, hour, -4, key="ticket-4711")
    assert again["already_recorded"] and again["id"] == first["id"]
    # Without a key the values are the key: typing the same command twice is one correction.
    assert correct(billing_runtime, hour, -1)["id"] == correct(billing_runtime, hour, -1)["id"]
    flush_pass(billing_runtime)
    assert correct(billing_runtime, hour, -4, key="ticket-4711")["status"] == "applied"
    flush_pass(billing_runtime)

    assert [c.method for c in corrections(billing_runtime)] == [
        "cancel_restate",
        "correcting_event",
    ]
    assert emulator.billed()[customer]["api_call"] == 10 - 4 - 1
    # One cancel: the first correction took the recent meter event, the second (planned in the
    # same pass) had none left to cancel and sent -1.
    assert emulator.stats()["meter_events"]["canceled"] == 1


def test_a_correction_after_another_restates_the_restated_total(billing_runtime, emulator):
    customer = add_accounts(billing_runtime, [ORG])[ORG]
    hour = this_hour(3)
    usage(billing_runtime, hour, 20)
    flush_pass(billing_runtime)
    correct(billing_runtime, hour, -5)
    flush_pass(billing_runtime)
    usage(billing_runtime, hour, 4)  # late usage of the same hour: its own outbox row
    correct(billing_runtime, hour, 3, reason="under-counted")
    assert flush_pass(billing_runtime).ok

    assert emulator.billed()[customer]["api_call"] == 20 - 5 + 4 + 3
    assert hourly(billing_runtime, customer, hour, hour + HOUR) == {hour: 22}
    statuses = sorted((r.status, r.value) for r in rows(billing_runtime))
    assert statuses == [("cancelled", 4), ("cancelled", 15), ("cancelled", 20), ("sent", 22)]


class Crash(BaseException):
    """A process dying at this point (BaseException: nothing on the way catches it)."""


def crash_once(monkeypatch, owner, name: str, *, before: bool = False) -> None:
    """Make `owner.name` die once: after doing its work (Stripe or the database has it, the
    caller never learns), or `before` it."""
    original = getattr(owner, name)
    fired = []

    def dying(*args, **kwargs):
        if fired:
            return original(*args, **kwargs)
        fired.append(True)
        if before:
            raise Crash(name)
        original(*args, **kwargs)
        raise Crash(name)

    monkeypatch.setattr(owner, name, dying)


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        # Stripe took the cancel; the answer is never recorded.
        (StripeGateway, "cancel_meter_event"),
        # The restated row is written; the pass dies before sending it.
        (correcting.Corrector, "release"),
        # Stripe took the restated meter event; its outcome is never recorded.
        (StripeGateway, "send_meter_event"),
    ],
    ids=["after-cancel", "after-release", "after-restate-sent"],
)
def test_a_crash_at_any_step_resumes_exactly_once(
    billing_runtime, emulator, monkeypatch, owner, name
):
    customer = add_accounts(billing_runtime, [ORG])[ORG]
    hour = this_hour(2)
    usage(billing_runtime, hour, 30)
    flush_pass(billing_runtime)
    correct(billing_runtime, hour, 6, reason="under-counted")
    crash_once(monkeypatch, owner, name)
    with pytest.raises(Crash):
        flush_pass(billing_runtime)
    monkeypatch.undo()

    assert flush_pass(billing_runtime).ok
    assert emulator.billed()[customer]["api_call"] == 36
    assert hourly(billing_runtime, customer, hour, hour + HOUR) == {hour: 36}
    assert emulator.stats()["meter_events"]["canceled"] == 1
    assert [c.status for c in corrections(billing_runtime)] == ["applied"]
    assert sorted((r.status, r.value) for r in rows(billing_runtime)) == [
        ("cancelled", 30),
        ("sent", 36),
    ]


def test_a_refused_cancel_corrects_by_event_exactly(billing_runtime, emulator, captured):
    customer = add_accounts(billing_runtime, [ORG])[ORG]
    hour = this_hour(2)
    usage(billing_runtime, hour, 8)
    flush_pass(billing_runtime)
    correct(billing_runtime, hour, 2, reason="under-counted")
    emulator.faults({"path": "/v1/billing/meter_event_adjustments", "status": 400, "count": 1})

    assert flush_pass(billing_runtime).ok
    assert emulator.billed()[customer]["api_call"] == 10
    assert emulator.stats()["meter_events"]["canceled"] == 0
    assert sorted((r.status, r.value) for r in rows(billing_runtime)) == [("sent", 2), ("sent", 8)]
    with billing_runtime.session_factory() as session:
        (cancel,) = session.scalars(sa.select(UsageCorrectionCancel))
    assert (cancel.status, cancel.attempts) == ("refused", 1)
    assert captured.messages(logs.USAGE_CORRECTION_CANCEL_REFUSED)


def test_a_cancel_refused_after_a_lost_answer_is_held_then_settled(
    billing_runtime, emulator, monkeypatch, captured
):
    customer = add_accounts(billing_runtime, [ORG])[ORG]
    hour = this_hour(2)
    usage(billing_runtime, hour, 12)
    flush_pass(billing_runtime)
    correct(billing_runtime, hour, 3, reason="under-counted")
    crash_once(monkeypatch, StripeGateway, "cancel_meter_event")  # cancelled; answer lost
    with pytest.raises(Crash):
        flush_pass(billing_runtime)
    monkeypatch.undo()
    assert emulator.billed()[customer]["api_call"] == 0

    # The flush is down for a day: Stripe forgot the idempotency key, the event is too old to
    # cancel, and the refusal could hide the first attempt's success.
    later = utcnow() + timedelta(hours=25)
    emulator.advance(25 * 3600)
    result = flush_pass(billing_runtime, clock=lambda: later)
    assert result.corrections_held == 1 and result.corrections_applied == 0
    (held,) = corrections(billing_runtime)
    assert held.status == "held" and captured.messages(logs.USAGE_CORRECTION_HELD)
    assert [r.status for r in rows(billing_runtime)] == ["cancelling"]

    # Stripe's summary of the hour is 0: the first attempt did cancel.
    assert hourly(billing_runtime, customer, hour, hour + HOUR) == {}
    settled = correcting.settle_held_correction(
        billing_runtime, held.id, cancelled=True, actor="ops", reason="summary 0"
    )
    assert settled["settled"] == [rows(billing_runtime)[0].id]
    assert flush_pass(billing_runtime, clock=lambda: later).corrections_applied == 1
    assert emulator.billed()[customer]["api_call"] == 15
    assert hourly(billing_runtime, customer, hour, hour + HOUR) == {hour: 15}


def test_correction_rows_written_by_plain_sql_are_taken_in_or_rejected(billing_runtime, emulator):
    from billing.ops.state import read_state

    customer = add_accounts(billing_runtime, [ORG])[ORG]
    hour = this_hour(2)
    usage(billing_runtime, hour, 9)
    flush_pass(billing_runtime)
    insert = sa.text(
        "INSERT INTO billable_event_corrections "
        "(organization_id, event_type, hour, delta, reason, idempotency_key, source) "
        "VALUES (:org, 'api_call', :hour, :delta, 'producer fix', :key, 'zeitgeist')"
    )
    with billing_runtime.engine.begin() as connection:
        for delta, key in ((2, "fix-1"), (-50, "fix-2"), (1.5, "fix-3")):
            connection.execute(insert, {"org": ORG, "hour": hour, "delta": delta, "key": key})

    assert flush_pass(billing_runtime).corrections_applied == 1
    assert emulator.billed()[customer]["api_call"] == 11
    with billing_runtime.session_factory() as session:
        upstream = {
            r.idempotency_key: r for r in session.scalars(sa.select(BillableEventCorrection))
        }
    assert upstream["fix-1"].usage_correction_id and upstream["fix-1"].rejected_reason is None
    assert "retraction of 50 exceeds the 11 billed" in upstream["fix-2"].rejected_reason
    assert "is not a whole number" in upstream["fix-3"].rejected_reason
    (taken,) = corrections(billing_runtime)
    assert (taken.source, taken.actor, taken.idempotency_key) == (
        "upstream",
        "upstream:zeitgeist",
        f"upstream:{upstream['fix-1'].id}",
    )
    assert read_state(billing_runtime).usage_corrections["rejected"] == 2
    # Taken once: the next flush finds nothing new.
    assert flush_pass(billing_runtime).corrections_applied == 0
    assert len(corrections(billing_runtime)) == 1


def test_embedded_sqlite_cancels_and_restates(sqlite_runtime, emulator):
    customer = add_accounts(sqlite_runtime, [ORG])[ORG]
    hour = this_hour(2)
    usage(sqlite_runtime, hour, 5, 6)
    flush_pass(sqlite_runtime)
    correct(sqlite_runtime, hour, 4, reason="under-counted")
    assert flush_pass(sqlite_runtime).corrections_applied == 1
    assert emulator.billed()[customer]["api_call"] == 15
    assert sorted((r.status, r.value) for r in rows(sqlite_runtime)) == [
        ("cancelled", 11),
        ("sent", 15),
    ]


def test_a_flush_killed_between_cancels_and_resends_is_exact_after_a_clean_run(
    billing_runtime, emulator
):
    """`flask billing flush_now` in a child process, SIGKILLed while it cancels 20 hours' meter
    events (Stripe slowed down); a clean pass then cancels the rest, re-sends every hour once."""
    customer = add_accounts(billing_runtime, [ORG])[ORG]
    hours = {this_hour(back): 10 + back for back in range(1, 21)}
    for hour, quantity in hours.items():
        usage(billing_runtime, hour, quantity)
    assert flush_pass(billing_runtime).ok
    for hour in hours:
        correct(billing_runtime, hour, -3)
    for path in ("/v1/billing/meter_event_adjustments", "/v1/billing/meter_events"):
        emulator.faults({"path": path, "latency_ms": 120, "count": 10_000})
    child = FlushChild(billing_env(billing_runtime.settings))
    deadline = time.monotonic() + 60
    while emulator.stats()["meter_events"]["canceled"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    child.kill(emulator)
    assert emulator.stats()["meter_events"]["canceled"] >= 3, "the flush never got going"
    left = Counter(c.status for c in corrections(billing_runtime))
    assert left["cancelling"] > 0, f"killed after the cancels: {left}"

    emulator.faults({"clear": True})
    result = flush_pass(billing_runtime)
    assert result.ok and result.corrections_applied + left["applied"] == 20
    assert emulator.stats()["meter_events"]["canceled"] == 20
    assert emulator.billed()[customer]["api_call"] == sum(hours.values()) - 3 * 20
    first, last = min(hours), max(hours) + HOUR
    assert hourly(billing_runtime, customer, first, last) == {h: q - 3 for h, q in hours.items()}
    assert {c.status for c in corrections(billing_runtime)} == {"applied"}
    statuses = Counter(r.status for r in rows(billing_runtime))
    assert statuses == {"cancelled": 20, "sent": 20}


def metered(runtime, emulator, hour: datetime, cents_per_unit: str) -> tuple[str, object]:
    """Org 7 subscribed to a metered api_call price from just before `hour`; the account knows
    the subscription and its period. (customer, subscription)"""
    from billing.accounts import store_subscription

    emulator.control("POST", "clock", {"set": int(hour.timestamp()) - 60})
    customer = add_accounts(runtime, [ORG])[ORG]
    client = runtime.stripe.client
    meter = runtime.stripe.meter_by_event_name()["api_call"]
    product = client.v1.products.create({"name": "API"})
    price = client.v1.prices.create(
        {
            "currency": "usd",
            "unit_amount_decimal": cents_per_unit,
            "product": product.id,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )
    subscription = client.v1.subscriptions.create(
        {"customer": customer, "items": [{"price": price.id}]}
    )
    store_subscription(runtime, ORG, subscription)
    return customer, subscription


def metered_quantity(runtime, invoice_id: str) -> list[int]:
    return [
        line.quantity
        for line in runtime.stripe.invoice_lines(invoice_id)
        if line.parent.type == "subscription_item_details"
    ]


def test_an_older_hour_of_the_open_period_gets_a_negative_correcting_event(
    billing_runtime, emulator
):
    hour = this_hour(2)
    customer, subscription = metered(billing_runtime, emulator, hour, "1")
    usage(billing_runtime, hour, 5, 7)
    flush_pass(billing_runtime)
    # A day later: Stripe can no longer cancel what it received.
    emulator.advance(25 * 3600)
    later = utcnow() + timedelta(hours=25)
    assert correct(billing_runtime, hour, -5)["method_as_of_now"] == "cancel_restate"
    result = flush_pass(billing_runtime, clock=lambda: later)

    (done,) = corrections(billing_runtime)
    assert (done.status, done.method, done.last_error) == ("applied", "correcting_event", None)
    assert result.ok and result.corrections_applied == 1
    original, correcting_row = rows(billing_runtime)
    assert (original.status, original.value) == ("sent", 12)
    assert (correcting_row.status, correcting_row.value, correcting_row.window_start) == (
        "sent",
        -5,
        hour,
    )
    assert emulator.stats()["meter_events"]["canceled"] == 0
    assert emulator.billed()[customer]["api_call"] == 7
    assert hourly(billing_runtime, customer, hour, hour + HOUR) == {hour: 7}
    # The period's invoice bills 7.
    period_end = subscription["items"].data[0].current_period_end
    emulator.control("POST", "clock", {"set": period_end + 10})
    (draft,) = billing_runtime.stripe.client.v1.invoices.list(
        {"customer": customer, "status": "draft"}
    ).data
    assert metered_quantity(billing_runtime, draft.id) == [7]


def test_an_invoiced_period_gets_a_credit_on_the_next_invoice_once(billing_runtime, emulator):
    from billing.accounts import store_subscription
    from billing.adjustments import invoice as invoices
    from billing.adjustments.service import list_adjustments

    hour = this_hour(2)
    customer, subscription = metered(billing_runtime, emulator, hour, "3")
    usage(billing_runtime, hour, 12)
    flush_pass(billing_runtime)
    client = billing_runtime.stripe.client
    first_end = subscription["items"].data[0].current_period_end
    emulator.control("POST", "clock", {"set": first_end + 3600 + 60})  # invoiced and finalized
    (invoiced,) = [
        i
        for i in client.v1.invoices.list({"customer": customer}).data
        if i.billing_reason == "subscription_cycle"
    ]
    assert invoiced.status != "draft" and invoiced.total == 36
    renewed = billing_runtime.stripe.retrieve_subscription(subscription.id)
    store_subscription(billing_runtime, ORG, renewed)

    quote = correct(billing_runtime, hour, -5, dry_run=True)
    assert quote["method_as_of_now"] == "credit"
    assert quote["would_send"]["credit"] == {"units": 5, "amount_cents": 15, "currency": "usd"}
    with pytest.raises(CorrectionError, match="already invoiced"):
        correct(billing_runtime, hour, 2)
    correct(billing_runtime, hour, -5, reason="outage hour")
    assert flush_pass(billing_runtime).corrections_applied == 1

    (done,) = corrections(billing_runtime)
    (credit,) = list_adjustments(billing_runtime, ORG)
    assert (done.status, done.method, done.billing_adjustment_id) == (
        "applied",
        "credit",
        credit["id"],
    )
    assert (credit["kind"], credit["amount_cents"], credit["currency"]) == ("credit", 15, "usd")
    assert credit["usage_correction_id"] == done.id
    line = f"Usage correction #{done.id}: -5 api_call {hour:%Y-%m-%dT%H:%M}Z (outage hour)"
    assert credit["description"] == line
    assert emulator.billed()[customer]["api_call"] == 12  # the meter keeps what was invoiced

    second_end = renewed["items"].data[0].current_period_end
    emulator.control("POST", "clock", {"set": second_end + 10})
    (draft,) = client.v1.invoices.list({"customer": customer, "status": "draft"}).data
    invoices.on_invoice_created(billing_runtime, draft.id)
    invoices.on_invoice_created(billing_runtime, draft.id)  # redelivered: nothing twice
    ours = [
        (item.amount, item.description)
        for item in billing_runtime.stripe.invoice_lines(draft.id)
        if invoices.KEY_METADATA in (item.metadata or {})
    ]
    assert ours == [(-15, line)]
    (credit,) = list_adjustments(billing_runtime, ORG)
    assert credit["pending"] is False and [a["invoice_id"] for a in credit["applied"]] == [draft.id]


def test_reconcile_finds_no_drift_after_a_cancel_and_restate(billing_runtime, emulator):
    from billing.usage.reconcile import reconcile

    add_accounts(billing_runtime, [ORG])
    hour = this_hour(3)
    usage(billing_runtime, hour, 5, 7)
    usage(billing_runtime, hour - HOUR, 4)
    flush_pass(billing_runtime)
    correct(billing_runtime, hour, -5)
    correct(billing_runtime, hour - HOUR, 2, reason="under-counted")
    flush_pass(billing_runtime)

    # Judged once Stripe's summaries settled after the restated rows reached it.
    settled = utcnow() + timedelta(seconds=billing_runtime.settings.reconcile_settle_seconds + 60)
    report = reconcile(billing_runtime, hour - 2 * HOUR, hour + HOUR, now=settled)
    assert report.ok, report.to_dict()
    assert report.to_dict()["groups"]["match"] == 2


def test_corrections_reach_the_counters_and_the_scraped_gauges(billing_runtime, emulator):
    from billing.usage.service import flush_guarded
    from tests.test_metrics import counter, scrape

    customer = add_accounts(billing_runtime, [ORG])[ORG]
    old, recent = this_hour(3), this_hour(2)
    usage(billing_runtime, old, 10)
    assert flush_guarded(billing_runtime).ok
    emulator.advance(25 * 3600)
    later = utcnow() + timedelta(hours=25)
    usage(billing_runtime, recent, 6)
    correct(billing_runtime, old, -4)
    units = counter("billing_units_billed_total", meter="api_call")
    # This run sends +6 of usage and -4 of correction; the next only a -4.
    assert flush_guarded(billing_runtime, clock=lambda: later).ok
    correct(billing_runtime, old, -4, key="second")
    assert flush_guarded(billing_runtime, clock=lambda: later).ok  # net -4: counted as 0
    assert counter("billing_units_billed_total", meter="api_call") == units + 2
    correct(billing_runtime, recent, -1)
    assert flush_guarded(billing_runtime, clock=lambda: later).ok

    assert emulator.billed()[customer]["api_call"] == 10 - 8 + 6 - 1
    scraped = scrape(billing_runtime.settings)
    assert scraped[("billing_usage_corrections", (("status", "applied"),))] == 3
    assert scraped[("billing_usage_corrections", (("status", "held"),))] == 0
    assert scraped[("billing_usage_corrections", (("status", "rejected"),))] == 0
    # A cancelled outbox row is done: it makes no usage look unbilled.
    assert scraped[("billing_oldest_unbilled_event_age_seconds", ())] == 0
    assert ("billing_outbox_rows", (("status", "cancelled"),)) not in scraped


def test_a_credit_stripe_cannot_price_fails_with_the_reason_and_sends_nothing(
    billing_runtime, emulator, captured
):
    from tests.usage.test_corrections import set_period

    customer = add_accounts(billing_runtime, [ORG])[ORG]
    hour = this_hour(3)
    usage(billing_runtime, hour, 10)
    flush_pass(billing_runtime)
    with billing_runtime.session_factory.begin() as session:
        session.execute(sa.text("UPDATE billing_accounts SET stripe_subscription_id = 'sub_gone'"))
    set_period(billing_runtime, hour + HOUR, hour + timedelta(days=30))
    correct(billing_runtime, hour, -4)

    result = flush_pass(billing_runtime)
    (failed,) = corrections(billing_runtime)
    assert (failed.status, failed.method) == ("failed", None)
    assert "sub_gone" in failed.last_error and captured.messages(logs.USAGE_CORRECTION_FAILED)
    assert result.corrections_applied == 0 and result.corrections_waiting == 0
    assert emulator.billed()[customer]["api_call"] == 10
    # A failed correction no longer reserves what it would have retracted.
    with pytest.raises(CorrectionError, match="retraction of 11 exceeds the 10 billed"):
        correct(billing_runtime, hour, -11)
