"""`flask billing usage unbillable|dismiss`: what the flush set aside is listed with its reason;
dismissing it is audited, all or nothing, and clears the counts, gauges and the oldest-unbilled age;
a fixed row (or a raised ceiling) is billed by the next flush, exactly once."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import create_app
from billing.checks.billability import REASONS
from billing.models import BillableEvent, UsageDismissal, utcnow
from billing.usage.service import flush_pass
from tests.factories import add_accounts, add_events, expected_totals
from tests.test_metrics import scrape

NORMAL = [(1, 3), (1, 4), (2, 5)]


def invoke(settings, *args: str):
    return create_app(settings).test_cli_runner().invoke(args=["billing", *args])


def _add(runtime, org: int, quantity, *, age=timedelta(hours=1), event_type="api_call") -> int:
    add_events(
        runtime,
        [
            {
                "organization_id": org,
                "event_type": event_type,
                "quantity": quantity,
                "occurred_at": utcnow() - age,
            }
        ],
    )
    with runtime.session_factory() as session:
        return session.scalar(sa.select(sa.func.max(BillableEvent.id)))


@pytest.fixture
def set_aside(billing_runtime, emulator):
    """Billed rows for orgs 1 and 2, and one row (or two) set aside for each reason below."""
    runtime = billing_runtime
    customers = add_accounts(runtime, [1, 2, 3])
    normal = [_add(runtime, org, q) for org, q in NORMAL]
    ids = {
        "huge": [_add(runtime, 3, 5 * 10**18), _add(runtime, 3, 5 * 10**18)],
        "over_event_ceiling": _add(runtime, 2, 2 * 10**12),
        "fraction": _add(runtime, 1, 1.5),
        "no_customer": _add(runtime, 9, 6),
        "too_old": _add(runtime, 1, 7, age=timedelta(days=40)),
        "normal": normal,
    }
    result = flush_pass(runtime)
    assert result.ok and result.events_claimed == len(NORMAL)
    assert result.unbillable == {
        "quantity_over_ceiling": 3,
        "invalid_quantity": 1,
        "no_customer": 1,
        "too_old": 1,
    }
    return runtime, customers, ids, emulator


def _dismissals(runtime) -> list[UsageDismissal]:
    with runtime.session_factory() as session:
        return list(session.scalars(sa.select(UsageDismissal).order_by(UsageDismissal.id)))


def _dismissed_ids(runtime) -> set[int]:
    with runtime.session_factory() as session:
        return set(
            session.scalars(
                sa.select(BillableEvent.id).where(BillableEvent.usage_dismissal_id.is_not(None))
            )
        )


def test_unbillable_lists_the_rows_set_aside_with_their_reason(set_aside):
    runtime, _, ids, _ = set_aside
    listed = invoke(runtime.settings, "usage", "unbillable", "--json")
    assert listed.exit_code == 0, listed.output
    payload = json.loads(listed.stdout)
    assert payload["counts"] == {
        **dict.fromkeys(REASONS, 0),
        "quantity_over_ceiling": 3,
        "invalid_quantity": 1,
        "no_customer": 1,
        "too_old": 1,
    }
    assert payload["total"] == 6
    by_id = {e["id"]: e for e in payload["events"]}
    assert by_id[ids["huge"][0]]["reason"] == "quantity_over_ceiling"
    assert by_id[ids["huge"][0]]["quantity"] == "5000000000000000000"
    assert by_id[ids["fraction"]] | {"occurred_at": None} == {
        "id": ids["fraction"],
        "reason": "invalid_quantity",
        "organization_id": 1,
        "event_type": "api_call",
        "quantity": "1.5",
        "occurred_at": None,
    }

    org = json.loads(
        invoke(runtime.settings, "usage", "unbillable", "--org-id", "3", "--json").stdout
    )
    assert [e["id"] for e in org["events"]] == ids["huge"] and org["total"] == 2
    old = invoke(runtime.settings, "usage", "unbillable", "--reason", "too_old", "--limit", "1")
    assert old.exit_code == 0 and "too_old 1" in old.stdout
    assert str(ids["too_old"]) in old.stdout.splitlines()[-1]


def test_dismissing_sets_usage_aside_for_good_and_clears_counts_gauges_and_age(set_aside):
    runtime, customers, ids, emulator = set_aside
    settings = runtime.settings
    before = json.loads(invoke(settings, "status", "--json").stdout)
    assert before["unbillable"]["too_old"] == 1
    assert before["backlog"]["oldest_unbilled_age_seconds"] > 39 * 86400
    over_ceiling = ("billing_unbillable_events", (("reason", "quantity_over_ceiling"),))
    assert scrape(settings)[over_ceiling] == 3

    by_org = invoke(
        settings,
        "usage",
        "dismiss",
        "--org-id",
        "3",
        "--unbillable",
        "quantity_over_ceiling",
        "--reason",
        "test producer wrote 5e18",
        "--actor",
        "alice",
    )
    assert by_org.exit_code == 0, by_org.output
    result = json.loads(by_org.stdout)
    assert result["event_count"] == 2 and result["actor"] == "alice"
    by_id = invoke(
        settings, "usage", "dismiss", str(ids["too_old"]), "--reason", "older than Stripe accepts"
    )
    assert by_id.exit_code == 0, by_id.output

    [first, second] = _dismissals(runtime)
    assert (first.unbillable_reason, first.event_count, first.reason, first.actor) == (
        "quantity_over_ceiling",
        2,
        "test producer wrote 5e18",
        "alice",
    )
    assert (second.unbillable_reason, second.event_count) == ("too_old", 1)
    assert second.actor and second.created_at
    assert _dismissed_ids(runtime) == {*ids["huge"], ids["too_old"]}

    after = json.loads(invoke(settings, "status", "--json").stdout)
    assert after["unbillable"] == {
        **dict.fromkeys(REASONS, 0),
        "quantity_over_ceiling": 1,
        "invalid_quantity": 1,
        "no_customer": 1,
    }
    assert after["backlog"]["unclaimed_events"] == 3
    assert after["backlog"]["oldest_unbilled_age_seconds"] < 2 * 3600  # the 40-day row is gone
    gauges = scrape(settings)
    assert gauges[("billing_unbillable_events", (("reason", "too_old"),))] == 0
    assert gauges[over_ceiling] == 1
    assert gauges[("billing_unclaimed_events", ())] == 3
    assert (
        "unbillable (set aside, pending): invalid_quantity 1, no_customer 1, "
        "quantity_over_ceiling 1" in invoke(settings, "status").stdout
    )

    # Dismissed usage is never billed, whatever later flushes find.
    assert flush_pass(runtime).unbillable == {
        "quantity_over_ceiling": 1,
        "invalid_quantity": 1,
        "no_customer": 1,
    }
    billed = [{"organization_id": o, "event_type": "api_call", "quantity": q} for o, q in NORMAL]
    assert emulator.billed() == expected_totals(billed, customers)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda ids: [str(ids["normal"][0])], "is claimed already"),
        (lambda ids: [str(ids["fraction"]), str(ids["normal"][0])], "is claimed already"),
        (lambda ids: [str(ids["fraction"]), "999999"], "billable event 999999 does not exist"),
        (lambda ids: ["--org-id", "1", "--unbillable", "no_customer"], "nothing to dismiss"),
        (lambda ids: [str(ids["billable_now"])], "is billable now: the next flush bills it"),
        (lambda ids: [str(ids["too_old"]), "--reason", "  "], "needs a reason"),
    ],
    ids=["claimed", "one-claimed-among-them", "unknown", "none-match", "billable", "no-reason"],
)
def test_a_refused_dismissal_changes_nothing(set_aside, args, message):
    runtime, _, ids, _ = set_aside
    ids["billable_now"] = _add(runtime, 1, 8)
    chosen = args(ids)
    reason = [] if "--reason" in chosen else ["--reason", "nope"]
    refused = invoke(runtime.settings, "usage", "dismiss", *chosen, *reason)
    assert refused.exit_code == 1, refused.output
    assert message in refused.output and "Traceback" not in refused.output
    assert refused.output.strip().splitlines()[-1].startswith("Error: ")
    assert _dismissals(runtime) == [] and _dismissed_ids(runtime) == set()


def test_dismissing_twice_is_refused(set_aside):
    runtime, _, ids, _ = set_aside
    first = invoke(runtime.settings, "usage", "dismiss", str(ids["too_old"]), "--reason", "old")
    assert first.exit_code == 0, first.output
    again = invoke(runtime.settings, "usage", "dismiss", str(ids["too_old"]), "--reason", "old")
    assert again.exit_code == 1 and "is dismissed already (dismissal 1)" in again.output
    assert len(_dismissals(runtime)) == 1


def test_selection_errors_are_usage_errors(set_aside):
    runtime, _, _, _ = set_aside
    both = invoke(runtime.settings, "usage", "dismiss", "1", "--org-id", "3", "--reason", "x")
    assert both.exit_code == 2 and "not both" in both.output
    neither = invoke(runtime.settings, "usage", "dismiss", "--reason", "x")
    assert neither.exit_code == 2
    stray = invoke(
        runtime.settings, "usage", "dismiss", "1", "--unbillable", "too_old", "--reason", "x"
    )
    assert stray.exit_code == 2 and "--unbillable goes with --org-id" in stray.output


def test_a_fixed_row_or_a_raised_ceiling_is_billed_exactly_once(set_aside):
    runtime, customers, ids, emulator = set_aside
    with runtime.engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE billable_events SET quantity = 2 WHERE id = :id"),
            {"id": ids["fraction"]},
        )
    fixed = flush_pass(runtime)
    assert fixed.events_claimed == 1 and fixed.billed_value == {"api_call": 2}

    runtime.settings = runtime.settings.replace(max_event_quantity=10**13)
    raised = flush_pass(runtime)
    assert raised.events_claimed == 1 and raised.billed_value == {"api_call": 2 * 10**12}
    assert raised.unbillable == {"quantity_over_ceiling": 2, "no_customer": 1, "too_old": 1}
    assert flush_pass(runtime).events_claimed == 0

    billed = [
        {"organization_id": o, "event_type": "api_call", "quantity": q}
        for o, q in [*NORMAL, (1, 2), (2, 2 * 10**12)]
    ]
    assert emulator.billed() == expected_totals(billed, customers)


def test_listing_and_dismissing_on_sqlite(sqlite_runtime, emulator):
    runtime = sqlite_runtime
    add_accounts(runtime, [1])
    fraction = _add(runtime, 1, 0.4)
    unmapped = _add(runtime, 1, 3, event_type="gpu_seconds")
    billable = _add(runtime, 1, 4)
    listing = json.loads(invoke(runtime.settings, "usage", "unbillable", "--json").stdout)
    assert {e["id"]: e["reason"] for e in listing["events"]} == {
        fraction: "invalid_quantity",
        unmapped: "no_meter",
    }
    refused = invoke(
        runtime.settings, "usage", "dismiss", str(fraction), str(billable), "--reason", "x"
    )
    assert refused.exit_code == 1 and "is billable now" in refused.output
    done = invoke(runtime.settings, "usage", "dismiss", "--org-id", "1", "--reason", "x")
    assert done.exit_code == 0, done.output
    assert sorted(d["unbillable_reason"] for d in json.loads(done.stdout)["dismissals"]) == [
        "invalid_quantity",
        "no_meter",
    ]
    assert _dismissed_ids(runtime) == {fraction, unmapped}
    result = flush_pass(runtime)
    assert result.events_claimed == 1 and result.unbillable == {}
