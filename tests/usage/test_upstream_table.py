"""`billable_events` as other programs write it: plain SQL with the contract's columns only, and a
`numeric` quantity column whose fractions must never be rounded into a meter event."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import create_app, db
from billing.checks.contract import run_contract_checks
from billing.models import utcnow
from billing.runtime import Runtime
from billing.usage.service import flush_pass
from tests.conftest import TEST_DATABASE_URL
from tests.factories import add_accounts, expected_totals, unclaimed_count

PRODUCER_INSERT = sa.text(
    "INSERT INTO billable_events "
    "(organization_id, event_type, quantity, occurred_at, source, idempotency_key) "
    "VALUES (:org, :type, :quantity, :occurred_at, 'zeitgeist', :key)"
)


def _produce(runtime: Runtime, org: int, quantities: list, occurred_at) -> list[int]:
    with runtime.engine.begin() as connection:
        for quantity in quantities:
            connection.execute(
                PRODUCER_INSERT,
                {
                    "org": org,
                    "type": "api_call",
                    "quantity": quantity,
                    "occurred_at": occurred_at,
                    "key": uuid.uuid4().hex,
                },
            )
        return list(connection.scalars(sa.text("SELECT id FROM billable_events ORDER BY id")))


@pytest.fixture
def own_schema(billing_settings):
    """A runtime on a PostgreSQL schema of its own (nothing in it yet)."""
    schema = f"billing_numeric_{uuid.uuid4().hex[:10]}"
    admin = db.make_engine(TEST_DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = db.with_search_path(TEST_DATABASE_URL, schema)
    runtime = Runtime(billing_settings.replace(database_url=url))
    yield runtime
    runtime.close()
    with admin.begin() as connection:
        connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    admin.dispose()


@pytest.fixture
def numeric_runtime(own_schema):
    """A schema of its own whose `quantity` is `numeric(18, 4)`, as the contract allows."""
    db.upgrade(own_schema.engine)
    with own_schema.engine.begin() as connection:
        connection.exec_driver_sql(
            "ALTER TABLE billable_events ALTER COLUMN quantity TYPE numeric(18, 4)"
        )
    return own_schema


@pytest.fixture
def adopted_numeric_runtime(own_schema):
    """A producer's unbounded `numeric` quantity, as on a table `db adopt` brought in (its column
    types are the producer's; the table comment is adoption's mark)."""
    db.upgrade(own_schema.engine)
    with own_schema.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE billable_events ALTER COLUMN quantity TYPE numeric")
        connection.exec_driver_sql("COMMENT ON TABLE billable_events IS 'billing: adopted'")
    return own_schema


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_a_producers_plain_insert_of_the_contract_columns_is_billed(request, emulator, database):
    runtime = request.getfixturevalue(
        "billing_runtime" if database == "postgresql" else "sqlite_runtime"
    )
    customers = add_accounts(runtime, [1])
    hour_ago = (
        "now() - interval '1 hour'" if database == "postgresql" else "datetime('now', '-1 hour')"
    )
    with runtime.engine.begin() as connection:
        for key, quantity in (("k1", 4), ("k2", 5)):
            connection.exec_driver_sql(
                "INSERT INTO billable_events "
                "(organization_id, event_type, quantity, occurred_at, source, idempotency_key) "
                f"VALUES (1, 'api_call', {quantity}, {hour_ago}, 'zeitgeist', '{key}')"
            )
        created = connection.exec_driver_sql("SELECT created_at FROM billable_events").all()
    assert len(created) == 2 and all(row[0] is not None for row in created)
    result = flush_pass(runtime)
    assert result.ok and result.events_claimed == 2
    assert emulator.billed() == {customers[1]: {"api_call": 9}}


def test_fractional_quantities_are_never_rounded_into_a_meter_event(numeric_runtime, emulator):
    runtime = numeric_runtime
    customers = add_accounts(runtime, [1])
    occurred_at = utcnow() - timedelta(hours=1)
    _produce(runtime, 1, ["0.4", "1.5", "2.7"], occurred_at)
    _produce(runtime, 1, ["3", "2.0"], occurred_at)

    result = flush_pass(runtime)
    assert result.events_claimed == 2
    assert result.unbillable == {"invalid_quantity": 3}
    assert emulator.billed() == {customers[1]: {"api_call": 5}}
    assert unclaimed_count(runtime) == 3

    report = run_contract_checks(runtime, lookback_days=30)
    failed = {f["check"]: f for f in report.failures()}
    assert "quantity_positive_integer" in failed


def test_a_1e30_row_in_an_adopted_numeric_table_is_reported_and_stops_nothing(
    adopted_numeric_runtime, emulator
):
    """`CAST(quantity AS BIGINT)` raised on 1e30: `validate_contract` and every flush failed."""
    runtime = adopted_numeric_runtime
    customers = add_accounts(runtime, [1, 2, 3])
    occurred_at = utcnow() - timedelta(hours=1)
    _produce(runtime, 1, ["3", "4"], occurred_at)
    _produce(runtime, 2, ["5"], occurred_at)
    hostile = _produce(runtime, 3, ["1e30"], occurred_at)[-1]

    cli = create_app(runtime.settings).test_cli_runner()
    checked = cli.invoke(args=["billing", "validate_contract", "--fail-closed", "--json"])
    assert checked.exit_code == 1, checked.output
    failed = {c["check"]: c for c in json.loads(checked.stdout)["checks"] if c["status"] == "fail"}
    assert set(failed) == {"quantity_within_ceiling"}
    assert failed["quantity_within_ceiling"]["sample_ids"] == [hostile]
    assert cli.invoke(args=["billing", "validate_contract"]).exit_code == 0  # not failing closed

    gated = runtime.settings.replace(validate_contract_before_flush=True)
    flushed = create_app(gated).test_cli_runner().invoke(args=["billing", "flush_now"])
    assert flushed.exit_code == 0, flushed.output
    result = json.loads(flushed.stdout)
    assert result["events_claimed"] == 3 and result["unbillable"] == {"quantity_over_ceiling": 1}
    assert [f["check"] for f in result["contract_failures"]] == ["quantity_within_ceiling"]
    rows = [
        {"organization_id": org, "event_type": "api_call", "quantity": q}
        for org, q in ((1, 3), (1, 4), (2, 5))
    ]
    assert emulator.billed() == expected_totals(rows, customers)
    assert unclaimed_count(runtime) == 1
