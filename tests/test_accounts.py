"""Period sync from the subscription items, before and after the emulator's clock rolls a period."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from billing.accounts import PeriodSyncError, sync_all_periods, sync_period, sync_subscription
from tests.factories import account_row, add_account, subscribe

DAY = 86_400


def item_period(runtime, subscription_id: str) -> tuple[datetime, datetime]:
    item = runtime.stripe.retrieve_subscription(subscription_id).items.data[0]
    return (
        datetime.fromtimestamp(item.current_period_start, UTC),
        datetime.fromtimestamp(item.current_period_end, UTC),
    )


def stored_period(runtime, organization_id: int) -> tuple[datetime | None, datetime | None]:
    account = account_row(runtime, organization_id)
    return account.current_period_start, account.current_period_end


def test_sync_stores_the_item_period_and_status(billing_runtime):
    subscription = subscribe(billing_runtime, 1)
    synced = sync_period(billing_runtime, 1)
    assert synced.changed and synced.status == "active"
    assert stored_period(billing_runtime, 1) == item_period(billing_runtime, subscription.id)
    assert account_row(billing_runtime, 1).subscription_status == "active"
    assert sync_period(billing_runtime, 1).changed is False  # nothing moved in Stripe


def test_sync_follows_the_clock_into_the_next_period(billing_runtime, emulator):
    subscription = subscribe(billing_runtime, 1)
    sync_period(billing_runtime, 1)
    first_start, first_end = stored_period(billing_runtime, 1)
    emulator.advance(int((first_end - first_start).total_seconds()) + DAY)
    synced = sync_period(billing_runtime, 1)
    assert synced.changed
    start, end = stored_period(billing_runtime, 1)
    assert start == first_end and end > start
    assert (start, end) == item_period(billing_runtime, subscription.id)


def test_sync_all_isolates_failures(billing_runtime, emulator):
    subscribe(billing_runtime, 1)
    subscribe(billing_runtime, 2)
    add_account(billing_runtime.engine, 3, "cus_gone", "sub_does_not_exist")
    add_account(billing_runtime.engine, 4, "cus_free")  # no subscription: not synced
    summary = sync_all_periods(billing_runtime)
    assert summary["accounts"] == 3 and summary["synced"] == 2
    assert summary["changed"] == [1, 2]
    [failure] = summary["failed"]
    assert failure["organization_id"] == 3 and "sub_does_not_exist" in failure["error"]
    assert stored_period(billing_runtime, 2)[0] is not None
    assert stored_period(billing_runtime, 4) == (None, None)


def test_sync_subscription_finds_a_new_subscription_by_customer(billing_runtime):
    subscription = subscribe(billing_runtime, 1)
    with billing_runtime.engine.begin() as connection:  # as before the webhook arrived
        connection.exec_driver_sql("UPDATE billing_accounts SET stripe_subscription_id = NULL")
    synced = sync_subscription(billing_runtime, subscription.id)
    assert synced == 1  # the organization whose account now follows the subscription
    assert account_row(billing_runtime, 1).stripe_subscription_id == subscription.id
    assert stored_period(billing_runtime, 1) == item_period(billing_runtime, subscription.id)


def test_sync_subscription_without_an_account(billing_runtime):
    subscription = subscribe(billing_runtime, 1)
    with billing_runtime.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM billing_accounts")
    assert sync_subscription(billing_runtime, subscription.id) is None


@pytest.mark.parametrize(
    ("customer", "message"), [(None, "no billing account"), ("cus_1", "no Stripe subscription")]
)
def test_sync_period_needs_an_account_with_a_subscription(billing_runtime, customer, message):
    if customer:
        add_account(billing_runtime.engine, 1, customer)
    with pytest.raises(PeriodSyncError, match=message):
        sync_period(billing_runtime, 1)
