"""Two hourly flushes at once, and a flush process killed mid-run."""

from __future__ import annotations

import threading
import time

from billing.usage.claiming import ClaimConflict, Claimer
from billing.usage.run import UsageFlush
from billing.usage.service import flush_guarded, flush_pass
from tests.factories import (
    add_accounts,
    add_events,
    expected_totals,
    random_events,
    submission_statuses,
    unclaimed_count,
)
from tests.process import FlushChild, billing_env

ORGS = [1, 2, 3]
TYPES = ["api_call", "storage_gb_hour"]


def test_two_flushes_started_together_run_exactly_once(billing_runtime, emulator, monkeypatch):
    customers = add_accounts(billing_runtime, ORGS)
    rows = random_events(ORGS, TYPES, 120)
    add_events(billing_runtime, rows)
    start = threading.Barrier(2)
    original = UsageFlush.run

    def slow_run(self):
        time.sleep(0.3)  # keep the winner inside the lock while the other tries
        return original(self)

    monkeypatch.setattr(UsageFlush, "run", slow_run)
    results = []

    def flush():
        start.wait()
        results.append(flush_guarded(billing_runtime))

    threads = [threading.Thread(target=flush) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    skipped = [r for r in results if r.skipped]
    ran = [r for r in results if not r.skipped]
    assert len(skipped) == 1 and len(ran) == 1
    assert skipped[0].events_claimed == 0 and skipped[0].submissions_sent == 0
    assert ran[0].events_claimed == len(rows)
    assert emulator.billed() == expected_totals(rows, customers)


def test_killed_flush_process_is_repaired_by_the_next_run(billing_runtime, emulator):
    customers = add_accounts(billing_runtime, ORGS)
    rows = random_events(ORGS, TYPES, 300, hours=20)
    add_events(billing_runtime, rows)
    # Slow Stripe down so the process is surely mid-submission when it is killed.
    emulator.faults({"path": "/v1/billing/meter_events", "latency_ms": 40, "count": 10_000})
    env = billing_env(
        billing_runtime.settings.replace(stripe_api_base=emulator.url),
        STRIPE_BILLING_VALIDATE_CONTRACT_BEFORE_FLUSH="0",
        STRIPE_USAGE_SUBMIT_CONCURRENCY="2",
    )
    child = FlushChild(env)
    deadline = time.monotonic() + 30
    while emulator.stats()["meter_events"]["accepted"] < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    child.kill(emulator)
    partial = emulator.stats()["meter_events"]["accepted"]
    assert partial >= 5, "the flush never got going"
    assert submission_statuses(billing_runtime)["pending"] > 0, "killed after it had finished"

    emulator.faults({"clear": True})
    result = flush_pass(billing_runtime)
    assert result.ok and unclaimed_count(billing_runtime) == 0
    assert emulator.billed() == expected_totals(rows, customers)
    assert emulator.stats()["meter_events"]["accepted"] < len(rows)  # aggregated, not per event


def test_two_unguarded_passes_claiming_the_same_rows_bill_each_once(
    billing_runtime, emulator, monkeypatch
):
    """`flush_now` and an organization's invoice flush take no lock; when two passes read the
    same rows, the second to link them finds fewer than it summed, rolls its batch back and
    picks again, so no row is in two outbox rows."""
    customers = add_accounts(billing_runtime, ORGS)
    rows = random_events(ORGS, TYPES, 400)
    add_events(billing_runtime, rows)
    both_reading = threading.Barrier(2)
    conflicts = []
    original = Claimer._claim_set_based
    first_batch = threading.local()

    def claim_together(self, session, now, token):
        if getattr(first_batch, "done", False):
            return original(self, session, now, token)
        first_batch.done = True
        both_reading.wait()  # both statements read the same unclaimed rows
        try:
            batch = original(self, session, now, token)
        except ClaimConflict:
            conflicts.append(token)
            raise
        time.sleep(0.3)  # hold the winner's transaction open: the other's link waits, then loses
        return batch

    monkeypatch.setattr(Claimer, "_claim_set_based", claim_together)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(flush_pass(billing_runtime)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(conflicts) == 1
    assert sum(r.events_claimed for r in results) == len(rows)
    assert unclaimed_count(billing_runtime) == 0
    assert emulator.billed() == expected_totals(rows, customers)
