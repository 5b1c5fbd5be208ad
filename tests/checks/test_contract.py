"""The billable_events contract checks against PostgreSQL (and once against SQLite)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import db
from billing.checks.contract import (
    CHECK_NAMES,
    CONTRACT_COLUMNS,
    CONTRACT_RULES,
    CORRECTION_COLUMNS,
    CORRECTION_RULES,
    MAX_EVENT_AGE,
    contract_markdown,
    corrections_markdown,
    run_contract_checks,
)
from billing.checks.report import Status
from billing.models import utcnow
from billing.runtime import Runtime
from billing.usage.service import flush_pass
from tests.factories import add_account, add_submission, altered, execute, insert_events

CLEAN_ORG = 1


@pytest.fixture
def runtime(make_runtime, settings):
    """Org 1 has a billing account with a customer and one good, fresh zeitgeist event."""
    rt = make_runtime(settings)
    add_account(rt.engine, CLEAN_ORG, "cus_clean")
    insert_events(rt.engine, {})
    return rt


def check(runtime: Runtime, name: str, **options):
    options.setdefault("lookback_days", 30)
    report = run_contract_checks(runtime, **options)
    return next(c for c in report.checks if c.check == name), report


def assert_only_failure(report, name: str) -> None:
    statuses = {c.check: c.status for c in report.checks}
    assert statuses.pop(name) is Status.FAIL
    assert Status.FAIL not in statuses.values(), report.table()


class TestCleanData:
    def test_every_check_passes(self, runtime):
        report = run_contract_checks(runtime, lookback_days=30, require_zeitgeist=True)
        assert [c.check for c in report.checks] == list(CHECK_NAMES)
        assert all(c.status is Status.PASS for c in report.checks), report.table()
        assert report.ok and report.failures() == []

    def test_zeitgeist_is_skipped_unless_required(self, runtime):
        result, report = check(runtime, "zeitgeist_fresh")
        assert result.status is Status.SKIP and report.ok


class TestDefects:
    """One seeded defect per check: that check fails with its count and ids, the others pass."""

    @pytest.mark.parametrize("column", ["organization_id", "event_type", "quantity", "occurred_at"])
    def test_null_in_a_required_column(self, runtime, db_engine, column):
        with altered(
            db_engine,
            f"ALTER TABLE billable_events ALTER COLUMN {column} DROP NOT NULL",
            f"ALTER TABLE billable_events ALTER COLUMN {column} SET NOT NULL",
        ):
            ids = insert_events(db_engine, {column: None}, {column: None})
            result, report = check(runtime, "required_values")
        assert (result.offending_rows, result.sample_ids) == (2, ids)
        assert f"{column} 2" in result.detail
        assert_only_failure(report, "required_values")

    def test_quantity_zero_or_negative(self, runtime, db_engine):
        ids = insert_events(db_engine, {"quantity": 0}, {"quantity": -3})
        result, report = check(runtime, "quantity_positive_integer")
        assert (result.offending_rows, result.sample_ids) == (2, ids)
        assert_only_failure(report, "quantity_positive_integer")

    def test_fractional_quantity_in_a_numeric_column(self, runtime, db_engine):
        # numeric is billing's own type since migration 0005; the restore must not leave bigint
        # behind for the session's later tests.
        with altered(
            db_engine,
            "ALTER TABLE billable_events ALTER COLUMN quantity TYPE numeric(18, 4)",
            "ALTER TABLE billable_events ALTER COLUMN quantity TYPE numeric",
        ):
            bad = insert_events(db_engine, {"quantity": 1.5})
            insert_events(db_engine, {"quantity": 2.0})
            result, _ = check(runtime, "quantity_positive_integer")
            schema, _ = check(runtime, "table_columns")
        assert schema.status is Status.PASS  # numeric is a compatible type
        assert (result.offending_rows, result.sample_ids) == (1, bad)

    def test_quantity_above_the_event_ceiling(self, runtime, db_engine):
        ceiling = runtime.settings.max_event_quantity
        bad = insert_events(db_engine, {"quantity": ceiling + 1}, {"quantity": 10**30})
        insert_events(db_engine, {"quantity": ceiling})
        result, report = check(runtime, "quantity_within_ceiling")
        assert (result.offending_rows, result.sample_ids) == (2, bad)
        assert_only_failure(report, "quantity_within_ceiling")

    def test_group_above_the_group_ceiling(self, make_runtime, settings, db_engine):
        rt = make_runtime(settings.replace(max_event_quantity=10, max_group_quantity=25))
        add_account(db_engine, CLEAN_ORG, "cus_clean")
        hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
        bad = insert_events(
            db_engine,
            *({"quantity": 10, "occurred_at": hour + timedelta(minutes=m)} for m in (1, 2, 3)),
        )
        # 25 is at the ceiling: passes.
        insert_events(
            db_engine,
            *(
                {"quantity": q, "occurred_at": hour + timedelta(hours=1, minutes=m)}
                for q, m in ((10, 1), (10, 2), (5, 3))
            ),
        )
        result, report = check(rt, "group_within_ceiling")
        assert (result.offending_rows, result.sample_ids) == (3, bad)
        assert result.detail.endswith("organization_id 1")
        assert_only_failure(report, "group_within_ceiling")

    def test_future_beyond_the_skew(self, runtime, db_engine):
        now = utcnow()
        bad = insert_events(db_engine, {"occurred_at": now + timedelta(minutes=10)})
        insert_events(db_engine, {"occurred_at": now + timedelta(minutes=4)})  # within the skew
        result, report = check(runtime, "occurred_at_not_future", now=now)
        assert (result.offending_rows, result.sample_ids) == (1, bad)
        assert_only_failure(report, "occurred_at_not_future")

    def test_unclaimed_older_than_the_flush_can_bill(self, runtime, db_engine):
        now = utcnow()
        too_old = now - MAX_EVENT_AGE - timedelta(hours=1)
        bad = insert_events(db_engine, {"occurred_at": too_old})
        submission = add_submission(db_engine, CLEAN_ORG, "cus_clean", too_old, 1)
        insert_events(db_engine, {"occurred_at": too_old, "usage_submission_id": submission})
        insert_events(db_engine, {"occurred_at": now - MAX_EVENT_AGE + timedelta(hours=1)})
        # Outside a 7-day lookback, and still reported: age is checked whatever the window.
        result, report = check(runtime, "occurred_at_billable_age", now=now, lookback_days=7)
        assert (result.offending_rows, result.sample_ids) == (1, bad)
        assert_only_failure(report, "occurred_at_billable_age")

    def test_event_type_without_a_meter(self, runtime, db_engine):
        bad = insert_events(db_engine, {"event_type": "api_calls"}, {"event_type": "gpu_seconds"})
        result, report = check(runtime, "event_type_has_meter")
        assert (result.offending_rows, result.sample_ids) == (2, bad)
        assert "api_calls, gpu_seconds" in result.detail
        assert_only_failure(report, "event_type_has_meter")

    def test_no_meters_configured_fails_every_pending_row(self, make_runtime, settings, db_engine):
        rt = make_runtime(settings.replace(stripe_meters={}))
        add_account(db_engine, CLEAN_ORG, "cus_clean")
        ids = insert_events(db_engine, {}, {"event_type": "storage_gb_hour"})
        result, _ = check(rt, "event_type_has_meter")
        assert (result.offending_rows, result.sample_ids) == (2, ids)

    def test_duplicate_idempotency_keys(self, runtime, db_engine):
        unique, _ = check(runtime, "idempotency_key_unique")
        assert "uq_billable_events_idempotency_key" in unique.detail
        with altered(
            db_engine,
            "ALTER TABLE billable_events DROP CONSTRAINT uq_billable_events_idempotency_key",
            "ALTER TABLE billable_events ADD CONSTRAINT uq_billable_events_idempotency_key "
            "UNIQUE (idempotency_key)",
        ):
            insert_events(db_engine, {"idempotency_key": "fine"})
            bad = insert_events(
                db_engine, {"idempotency_key": "twice"}, {"idempotency_key": "twice"}
            )
            result, report = check(runtime, "idempotency_key_unique")
        assert (result.offending_rows, result.sample_ids) == (2, bad)
        assert "share 1 idempotency key" in result.detail
        assert_only_failure(report, "idempotency_key_unique")

    def test_organization_without_a_stripe_customer(self, runtime, db_engine):
        add_account(db_engine, 3, customer=None)  # an account, but no customer yet
        bad = insert_events(db_engine, {"organization_id": 2}, {"organization_id": 3})
        result, report = check(runtime, "organization_has_customer")
        assert (result.offending_rows, result.sample_ids) == (2, bad)
        assert result.detail.endswith("organization_id 2, 3")
        assert_only_failure(report, "organization_has_customer")


class TestZeitgeist:
    def test_required_and_absent(self, runtime, db_engine):
        execute(db_engine, "UPDATE billable_events SET source = 'batch'")
        insert_events(db_engine, {"source": None})
        result, report = check(runtime, "zeitgeist_fresh", require_zeitgeist=True)
        assert result.status is Status.FAIL and "no events from source 'zeitgeist'" in result.detail
        assert_only_failure(report, "zeitgeist_fresh")

    def test_newest_too_old_shows_a_dead_producer(self, make_runtime, settings, db_engine):
        rt = make_runtime(settings.replace(contract_zeitgeist_max_age_hours=24))
        add_account(db_engine, CLEAN_ORG, "cus_clean")
        insert_events(db_engine, {"occurred_at": utcnow() - timedelta(hours=30)})
        result, _ = check(rt, "zeitgeist_fresh", require_zeitgeist=True)
        assert result.status is Status.FAIL and "30.0 h ago, over the 24 h limit" in result.detail
        relaxed = make_runtime(settings.replace(contract_zeitgeist_max_age_hours=48))
        assert check(relaxed, "zeitgeist_fresh", require_zeitgeist=True)[0].status is Status.PASS

    def test_events_outside_the_window_do_not_count(self, make_runtime, settings, db_engine):
        rt = make_runtime(settings.replace(contract_zeitgeist_max_age_hours=100))
        insert_events(db_engine, {"occurred_at": utcnow() - timedelta(days=3)})
        outside, _ = check(rt, "zeitgeist_fresh", require_zeitgeist=True, lookback_days=2)
        assert outside.status is Status.FAIL and "no events" in outside.detail
        inside, _ = check(rt, "zeitgeist_fresh", require_zeitgeist=True, lookback_days=4)
        assert inside.status is Status.PASS

    def test_setting_requires_it_when_the_caller_does_not_say(self, make_runtime, settings):
        rt = make_runtime(settings.replace(contract_require_zeitgeist=True))
        result, _ = check(rt, "zeitgeist_fresh")
        assert result.status is Status.FAIL  # no events at all in this test
        assert check(rt, "zeitgeist_fresh", require_zeitgeist=False)[0].status is Status.SKIP


class TestSchema:
    @pytest.mark.parametrize(
        ("change", "restore", "problem"),
        [
            (
                "ALTER TABLE billable_events RENAME COLUMN source TO producer",
                "ALTER TABLE billable_events RENAME COLUMN producer TO source",
                "missing column source",
            ),
            (
                "ALTER TABLE billable_events ALTER COLUMN occurred_at TYPE timestamp",
                "ALTER TABLE billable_events ALTER COLUMN occurred_at TYPE timestamptz",
                "occurred_at is timestamp without time zone",
            ),
            (
                "ALTER TABLE billable_events ALTER COLUMN quantity TYPE text",
                "ALTER TABLE billable_events ALTER COLUMN quantity TYPE numeric "
                "USING quantity::numeric",
                "quantity is TEXT",
            ),
            (
                "ALTER TABLE billable_events RENAME TO billable_events_old",
                "ALTER TABLE billable_events_old RENAME TO billable_events",
                "table billable_events does not exist",
            ),
        ],
    )
    def test_incompatible_schema_fails_and_skips_the_rest(
        self, runtime, db_engine, change, restore, problem
    ):
        with altered(db_engine, change, restore, truncate=False):
            result, report = check(runtime, "table_columns")
        assert result.status is Status.FAIL and problem in result.detail
        others = [c for c in report.checks if c.check != "table_columns"]
        assert {c.status for c in others} == {Status.SKIP}


class TestScope:
    def test_lookback_window_limits_the_row_checks(self, runtime, db_engine):
        ten_days_ago = utcnow() - timedelta(days=10)
        insert_events(db_engine, {"event_type": "api_calls", "occurred_at": ten_days_ago})
        assert not run_contract_checks(runtime, lookback_days=30).ok
        assert run_contract_checks(runtime, lookback_days=7).ok

    def test_organization_scope_ignores_other_organizations(self, runtime, db_engine):
        insert_events(db_engine, {"organization_id": 2, "quantity": 0})
        assert not run_contract_checks(runtime, lookback_days=30).ok
        assert run_contract_checks(runtime, lookback_days=30, organization_id=CLEAN_ORG).ok
        scoped = run_contract_checks(runtime, lookback_days=30, organization_id=2)
        assert {f["check"] for f in scoped.failures()} == {
            "quantity_positive_integer",
            "organization_has_customer",
        }

    def test_claimed_rows_are_not_rechecked(self, runtime, db_engine):
        """A claimed row was billed; a meter removed later does not make it a defect."""
        hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
        submission = add_submission(db_engine, CLEAN_ORG, "cus_clean", hour, 1, event_name="old")
        insert_events(db_engine, {"event_type": "old", "usage_submission_id": submission})
        assert run_contract_checks(runtime, lookback_days=30).ok

    def test_lookback_must_be_positive(self, runtime):
        with pytest.raises(ValueError, match="lookback_days"):
            run_contract_checks(runtime, lookback_days=0)


class TestReport:
    def test_failures_dict_and_table(self, runtime, db_engine):
        ids = insert_events(db_engine, *({"quantity": 0} for _ in range(7)))
        report = run_contract_checks(runtime, lookback_days=30)
        [failure] = report.failures()
        assert failure["check"] == "quantity_positive_integer"
        assert failure["offending_rows"] == 7
        assert len(failure["sample_ids"]) == 5 and set(failure["sample_ids"]) <= set(ids)
        assert failure["detail"].startswith("7 pending row(s)")
        as_dict = report.to_dict()
        assert as_dict["ok"] is False and as_dict["lookback_days"] == 30
        assert [c["check"] for c in as_dict["checks"]] == list(CHECK_NAMES)
        lines = report.table().splitlines()
        headers = ["check", "status", "offending", "rows", "sample", "ids", "detail"]
        assert lines[0].split() == headers
        column = lines[0].index("status")
        assert all(line[column : column + 4] in ("pass", "fail", "skip") for line in lines[1:])
        row = next(line for line in lines if line.startswith("quantity_positive_integer"))
        assert ",".join(map(str, failure["sample_ids"])) in row

    def test_markdown_renders_every_column_and_rule(self):
        text = contract_markdown()
        for column in CONTRACT_COLUMNS:
            assert f"| `{column.name}` | {column.sql} |" in text
        for rule in CONTRACT_RULES:
            assert f"| `{rule.check}` | {rule.rule} |" in text


class TestPreFlushGate:
    def test_fail_closed_gate_blocks_the_flush(self, make_runtime, settings, db_engine):
        rt = make_runtime(
            settings.replace(validate_contract_before_flush=True, contract_fail_closed=True)
        )
        add_account(db_engine, CLEAN_ORG, "cus_clean")
        insert_events(db_engine, {"event_type": "api_calls"})
        result = flush_pass(rt)  # blocked before any Stripe call: no api base is configured
        assert result.blocked
        assert [f["check"] for f in result.contract_failures] == ["event_type_has_meter"]
        assert result.contract_failures[0]["offending_rows"] == 1


def test_checks_run_on_sqlite(tmp_path, settings):
    rt = Runtime(
        settings.replace(
            database_url=f"sqlite:///{tmp_path / 'billing.db'}",
            max_event_quantity=10,
            max_group_quantity=25,
        )
    )
    try:
        db.upgrade(rt.engine)
        now = utcnow()
        add_account(rt.engine, CLEAN_ORG, "cus_clean")
        insert_events(rt.engine, {})
        defects = {
            "quantity_positive_integer": {"quantity": 0},
            "occurred_at_not_future": {"occurred_at": now + timedelta(hours=1)},
            "occurred_at_billable_age": {"occurred_at": now - timedelta(days=40)},
            "event_type_has_meter": {"event_type": "nope"},
            "organization_has_customer": {"organization_id": 9},
        }
        bad = {name: insert_events(rt.engine, row) for name, row in defects.items()}
        bad["quantity_within_ceiling"] = insert_events(
            rt.engine, {"quantity": 11}, {"quantity": 1e30}
        )
        three_hours_ago = now - timedelta(hours=3)
        bad["group_within_ceiling"] = insert_events(
            rt.engine, *({"quantity": 10, "occurred_at": three_hours_ago} for _ in range(3))
        )
        report = run_contract_checks(rt, lookback_days=30, require_zeitgeist=True, now=now)
        failed = {f["check"]: f["sample_ids"] for f in report.failures()}
        assert failed == bad
        assert {c.check: c.status for c in report.checks}["zeitgeist_fresh"] is Status.PASS
    finally:
        rt.close()


def test_the_flush_page_shows_the_contract_as_the_code_defines_it():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "flush.md").read_text()
    assert contract_markdown() in page
    assert corrections_markdown() in page


def insert_corrections(engine, *rows: dict) -> list[int]:
    """Upstream correction rows as a producer writes them (plain SQL); their ids."""
    hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    ids = []
    with engine.begin() as connection:
        for row in rows:
            values = {
                "organization_id": CLEAN_ORG,
                "event_type": "api_call",
                "hour": hour,
                "delta": -1,
                "reason": "fix",
                "idempotency_key": f"fix-{uuid.uuid4().hex}",
                **row,
            }
            ids.append(
                connection.execute(
                    sa.text(
                        "INSERT INTO billable_event_corrections "
                        "(organization_id, event_type, hour, delta, reason, idempotency_key) "
                        "VALUES (:organization_id, :event_type, :hour, :delta, :reason, "
                        ":idempotency_key) RETURNING id"
                    ),
                    values,
                ).scalar_one()
            )
    return ids


class TestCorrectionRows:
    def test_good_pending_rows_pass(self, runtime, db_engine):
        insert_corrections(db_engine, {}, {"delta": 4})
        result, report = check(runtime, "correction_values")
        assert result.status is Status.PASS and result.detail == "0 of 2 pending rows"
        assert report.ok

    def test_rows_the_flush_would_reject_fail_with_samples(self, runtime, db_engine):
        hour = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
        good = insert_corrections(db_engine, {})
        bad = insert_corrections(
            db_engine,
            {"delta": 0},
            {"delta": 1.5},
            {"hour": hour + timedelta(minutes=7)},
            {"hour": hour + timedelta(days=1)},
            {"event_type": "api_calls"},
            {"organization_id": 77},
        )
        result, report = check(runtime, "correction_values")
        assert_only_failure(report, "correction_values")
        assert result.offending_rows == 6 and set(result.sample_ids) <= set(bad)
        assert not set(result.sample_ids) & set(good)
        for what in (
            "delta is 0 or not a whole number 2",
            "hour is not the start of an hour 1",
            "hour is ahead of now 1",
            "event_type has no meter in STRIPE_BILLING_METERS 1",
            "organization without a billing account with a Stripe customer 1",
        ):
            assert what in result.detail
        scoped = run_contract_checks(runtime, lookback_days=30, organization_id=77)
        assert [f["offending_rows"] for f in scoped.failures()] == [1]

    def test_rows_taken_or_rejected_are_not_checked(self, runtime, db_engine):
        (row,) = insert_corrections(db_engine, {"delta": 0})
        execute(
            db_engine,
            f"UPDATE billable_event_corrections SET rejected_reason = 'x' WHERE id = {row}",
        )
        assert check(runtime, "correction_values")[0].status is Status.PASS

    def test_a_missing_column_fails_and_skips_the_values(self, runtime, db_engine):
        with altered(
            db_engine,
            "ALTER TABLE billable_event_corrections RENAME COLUMN reason TO why",
            "ALTER TABLE billable_event_corrections RENAME COLUMN why TO reason",
            truncate=False,
        ):
            schema, report = check(runtime, "corrections_table_columns")
        assert schema.status is Status.FAIL and "missing column reason" in schema.detail
        assert {c.check: c.status for c in report.checks}["correction_values"] is Status.SKIP

    def test_markdown_renders_every_column_and_rule(self):
        text = corrections_markdown()
        for column in CORRECTION_COLUMNS:
            assert f"| `{column.name}` | {column.sql} |" in text
        for rule in CORRECTION_RULES:
            assert f"| `{rule.check}` | {rule.rule} |" in text
