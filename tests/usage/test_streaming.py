"""The v2 sender (`STRIPE_METER_EVENT_API=v2`) against real PostgreSQL and the emulator over HTTP:
totals exact, requests of 100, the session renewed before expiry and after a 401, a failed
request re-sent whole, a flush killed mid-stream repaired by the next run."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import logs, metrics
from billing.models import UsageSubmission, utcnow
from billing.usage.result import FlushResult
from billing.usage.service import flush_pass
from billing.usage.streaming import StreamSender, deal
from tests.factories import (
    add_accounts,
    add_events,
    expected_totals,
    rate_limited,
    submission_statuses,
    unclaimed_count,
)
from tests.fixtures.processes import settings_env
from tests.process import FlushChild

TYPES = ["api_call", "storage_gb_hour"]
STREAM = "POST /v2/billing/meter_event_stream"


def grid(orgs: list[int], hours: range, now) -> list[dict]:
    """One event per organization, type and hour: as many outbox rows (groups) as events."""
    top = now.replace(minute=0, second=0, microsecond=0)
    return [
        {
            "organization_id": org,
            "event_type": event_type,
            "quantity": 1 + (org * 7 + h * 3 + i) % 40,
            "occurred_at": top - timedelta(hours=h) + timedelta(minutes=10),
        }
        for org in orgs
        for i, event_type in enumerate(TYPES)
        for h in hours
    ]


@pytest.fixture
def v2_runtime(make_runtime, billing_settings):
    return make_runtime(billing_settings.replace(stripe_meter_event_api="v2", submit_concurrency=1))


@pytest.fixture
def seeded(v2_runtime):
    orgs = list(range(1, 51))
    customers = add_accounts(v2_runtime, orgs)
    rows = grid(orgs, range(1, 4), utcnow())  # 50 orgs, 2 types, 3 hours: 300 groups
    add_events(v2_runtime, rows)
    return customers, rows, orgs


def stream_stats(emulator) -> dict:
    return emulator.stats()["meter_event_stream"]


def renewals() -> float:
    return metrics.METER_EVENT_SESSION_RENEWALS._value.get()


def test_totals_exact_in_requests_of_exactly_100(v2_runtime, emulator, seeded, caplog):
    customers, rows, _ = seeded
    caplog.set_level(logging.INFO, logger="billing.usage")
    result = flush_pass(v2_runtime)

    assert result.ok and result.submissions_sent == len(rows) == 300
    assert emulator.billed() == expected_totals(rows, customers)
    assert submission_statuses(v2_runtime) == {"sent": 300}
    assert unclaimed_count(v2_runtime) == 0
    stats = stream_stats(emulator)
    assert (stats["requests"], stats["events"], stats["sessions"]) == (3, 300, 1)
    assert emulator.stats()["requests"].get("POST /v1/billing/meter_events") is None
    lines = [r for r in caplog.records if getattr(r, "api", None) == "v2"]
    attempts = [r for r in lines if r.getMessage() == logs.METER_SUBMIT_ATTEMPT]
    succeeded = [r for r in lines if r.getMessage() == logs.METER_SUBMIT_SUCCEEDED]
    assert [r.events for r in attempts] == [100, 100, 100]
    assert [r.events for r in succeeded] == [100, 100, 100]


def test_lanes_keep_totals_exact(make_runtime, billing_settings, emulator, seeded):
    customers, rows, _ = seeded
    runtime = make_runtime(
        billing_settings.replace(stripe_meter_event_api="v2", submit_concurrency=8)
    )
    result = flush_pass(runtime)
    assert result.ok and result.submissions_sent == len(rows)
    assert emulator.billed() == expected_totals(rows, customers)
    stats = stream_stats(emulator)
    assert stats["events"] == 300 and stats["requests"] == 8  # 38 or 37 rows a lane


def test_session_renewed_before_it_expires(v2_runtime, emulator, seeded):
    customers, rows, orgs = seeded
    emulator.settings(meter_event_session_seconds=3)
    before = renewals()
    assert flush_pass(v2_runtime).ok
    time.sleep(3.2)  # past the renewal margin (3 s / 5) and the expiry itself
    more = grid(orgs, range(4, 5), utcnow())
    add_events(v2_runtime, more)
    result = flush_pass(v2_runtime)

    assert result.ok and result.submissions_sent == len(more)
    stats = stream_stats(emulator)
    assert stats["expired"] == 0 and stats["sessions"] == 2
    assert renewals() - before == 2  # the first session and one renewal
    assert emulator.billed() == expected_totals(rows + more, customers)


def test_session_renewed_after_a_401_without_stopping_the_run(v2_runtime, emulator, seeded):
    customers, rows, orgs = seeded
    assert flush_pass(v2_runtime).ok
    emulator.advance(901)  # Stripe's clock past the token's expiry; ours still trusts it
    more = grid(orgs, range(4, 5), utcnow())
    add_events(v2_runtime, more)
    result = flush_pass(v2_runtime)

    assert result.ok and result.stop_error is None and result.submissions_stopped == 0
    assert result.submissions_sent == len(more) and result.submissions_failed == 0
    stats = stream_stats(emulator)
    assert stats["expired"] == 1 and stats["sessions"] == 2
    assert emulator.stats()["responses"][STREAM].get("401") == 1
    assert submission_statuses(v2_runtime) == {"sent": len(rows) + len(more)}
    assert emulator.billed() == expected_totals(rows + more, customers)


@pytest.mark.parametrize("status", [503, 429, "dropped"])
def test_failed_request_is_re_sent_whole(v2_runtime, emulator, seeded, status):
    customers, rows, _ = seeded
    fault = {"drop": True} if status == "dropped" else {"status": status}
    emulator.faults({"path": "/v2/billing/meter_event_stream", "count": 2, **fault})
    limited_before = rate_limited("v2")
    result = flush_pass(v2_runtime)
    assert rate_limited("v2") - limited_before == (2 if status == 429 else 0)

    assert result.ok and result.submissions_sent == len(rows)
    answered = "0" if status == "dropped" else str(status)  # the emulator counts a drop as 0
    assert emulator.stats()["responses"][STREAM] == {answered: 2, "200": 3}
    assert emulator.billed() == expected_totals(rows, customers)
    assert submission_statuses(v2_runtime) == {"sent": 300}


def test_a_stream_request_already_accepted_then_re_sent_bills_once(v2_runtime, emulator, seeded):
    """A crash after Stripe took a request but before the rows were recorded: the re-send's
    identifiers are duplicates, dropped by Stripe."""
    customers, rows, _ = seeded
    assert flush_pass(v2_runtime).ok
    with v2_runtime.session_factory.begin() as session:
        session.execute(sa.update(UsageSubmission).values(status="pending"))
    result = flush_pass(v2_runtime)
    assert result.submissions_sent == len(rows)
    assert emulator.billed() == expected_totals(rows, customers)
    assert emulator.stats()["meter_events"]["duplicates"] == len(rows)


def test_killed_v2_flush_then_a_clean_run_is_exact(v2_runtime, emulator, seeded):
    customers, rows, _ = seeded
    emulator.faults({"path": "/v2/billing/meter_event_stream", "latency_ms": 400, "count": 10_000})
    env = settings_env(
        v2_runtime.settings.replace(stripe_api_base=emulator.url),
        STRIPE_METER_EVENT_API="v2",
        STRIPE_USAGE_SUBMIT_CONCURRENCY="1",
    )
    child = FlushChild(env)
    deadline = time.monotonic() + 30
    while stream_stats(emulator)["requests"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    child.kill(emulator)
    assert stream_stats(emulator)["requests"] >= 1, "the flush never got going"
    assert submission_statuses(v2_runtime)["pending"] > 0, "killed after it had finished"

    emulator.faults({"clear": True})
    result = flush_pass(v2_runtime)
    assert result.ok and unclaimed_count(v2_runtime) == 0
    assert emulator.billed() == expected_totals(rows, customers)
    assert submission_statuses(v2_runtime) == {"sent": 300}


def test_lanes_are_dealt_runs_of_ids_and_a_pair_stays_in_one_lane():
    # 30 customers, the first with 8 rows (two meters x four hours), the rest one row each: 37
    # rows in id order as the claim writes them, over 4 lanes.
    rows, next_id = [], 1
    for customer in range(30):
        for meter in ("api", "storage") if customer == 0 else ("api",):
            for _hour in range(4 if customer == 0 else 1):
                rows.append(
                    UsageSubmission(
                        id=next_id, stripe_customer_id=f"cus_{customer}", event_name=meter
                    )
                )
                next_id += 1
    rows.reverse()  # dealt in id order whatever order they come in
    lanes = deal(rows, 4)
    assert sorted(r.id for lane in lanes for r in lane) == list(range(1, 38))
    assert [len(lane) for lane in lanes] == [10, 10, 10, 7]
    for lane in lanes:  # each lane one stretch of ids, in order
        ids = [r.id for r in lane]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
    lane_of_pair = {}
    for number, lane in enumerate(lanes):
        for r in lane:
            assert lane_of_pair.setdefault((r.stripe_customer_id, r.event_name), number) == number
    assert [len(lane) for lane in deal(rows[:3], 8)] == [1, 1, 1]


def test_lanes_counting_at_the_same_time_lose_no_count():
    """Lanes count their recorded rows into the one run result at the same time. A lane that read
    a total and lost the GIL before writing it back (forced here between `billed.get` and the
    store) would overwrite another lane's count: the result's billed totals and counts would be
    short of what was sent."""

    class YieldingTotals(dict):
        def get(self, *args):
            value = super().get(*args)
            time.sleep(0)  # another lane runs between this read and its write
            return value

    result = FlushResult(billed_value=YieldingTotals())
    sender = StreamSender(
        None, None, None, result,
        clock=utcnow, lanes=None, lane_count=8, retrying=None, call_attempts=1, lane_log=None,
    )  # fmt: skip
    rows = [UsageSubmission(event_type="api_call", value=1) for _ in range(300)]
    lanes = [threading.Thread(target=sender._count_sent, args=(rows,)) for _ in range(8)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    assert result.billed_value == {"api_call": 2400}
    assert result.submissions_sent == 2400
