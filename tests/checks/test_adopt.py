"""`flask billing db adopt`: an existing billable_events table (rows, ids, the producer's own
columns and names) comes under billing's migrations in place, and is then billed."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from billing import create_app, db
from billing.models import utcnow
from billing.runtime import Runtime
from billing.usage.service import flush_pass
from tests.conftest import TEST_DATABASE_URL
from tests.factories import add_accounts

PRODUCER_TABLE = {
    "postgresql": """
        CREATE TABLE billable_events (
            id bigserial CONSTRAINT billable_events_pkey PRIMARY KEY,
            organization_id bigint NOT NULL,
            event_type text NOT NULL,
            quantity numeric NOT NULL,
            occurred_at timestamptz NOT NULL,
            source text,
            idempotency_key text NOT NULL CONSTRAINT events_key_unique UNIQUE,
            created_at timestamptz,
            producer_note text
        )""",
    "sqlite": """
        CREATE TABLE billable_events (
            id INTEGER PRIMARY KEY,
            organization_id BIGINT NOT NULL,
            event_type VARCHAR(100) NOT NULL,
            quantity BIGINT NOT NULL,
            occurred_at DATETIME NOT NULL,
            source VARCHAR(64),
            idempotency_key VARCHAR(255) NOT NULL UNIQUE,
            producer_note TEXT
        )""",
}
# A producer that copied billing's own names (e.g. from its models): 0001 must not clash.
BILLING_NAMED_TABLE = """
    CREATE TABLE billable_events (
        id bigserial CONSTRAINT pk_billable_events PRIMARY KEY,
        organization_id bigint NOT NULL,
        event_type varchar(100) NOT NULL,
        quantity bigint NOT NULL,
        occurred_at timestamptz NOT NULL,
        source varchar(64),
        idempotency_key varchar(255) NOT NULL
            CONSTRAINT uq_billable_events_idempotency_key UNIQUE
    );
    CREATE INDEX ix_billable_events_organization_id_occurred_at
        ON billable_events (organization_id, occurred_at)"""


@pytest.fixture(params=["postgresql", "sqlite"])
def producer_db(request, billing_settings, tmp_path):
    """A database where only the producer's billable_events exists, with rows."""
    if request.param == "sqlite":
        url, cleanup = f"sqlite:///{tmp_path / 'producer.db'}", None
    else:
        schema = f"billing_adopt_{uuid.uuid4().hex[:10]}"
        admin = db.make_engine(TEST_DATABASE_URL)
        with admin.begin() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = db.with_search_path(TEST_DATABASE_URL, schema)

        def cleanup() -> None:
            with admin.begin() as connection:
                connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            admin.dispose()

    runtime = Runtime(billing_settings.replace(database_url=url))
    yield runtime, request.param
    runtime.close()
    if cleanup:
        cleanup()


def _produce(runtime: Runtime, count: int, *, start: int = 0) -> list[int]:
    occurred = utcnow() - timedelta(hours=1)
    with runtime.engine.begin() as connection:
        for n in range(start, start + count):
            connection.execute(
                sa.text(
                    "INSERT INTO billable_events "
                    "(organization_id, event_type, quantity, occurred_at, source, idempotency_key)"
                    " VALUES (1, 'api_call', :q, :at, 'zeitgeist', :key)"
                ),
                {"q": n + 1, "at": occurred.isoformat(sep=" "), "key": f"evt-{n}"},
            )
        return list(connection.scalars(sa.text("SELECT id FROM billable_events ORDER BY id")))


def _invoke(runtime: Runtime, *args: str):
    return create_app(runtime.settings).test_cli_runner().invoke(args=["billing", "db", *args])


def test_an_existing_table_is_adopted_in_place_and_billed(producer_db, emulator):
    runtime, dialect = producer_db
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql(PRODUCER_TABLE[dialect])
    ids = _produce(runtime, 40)

    refused = _invoke(runtime, "upgrade")
    assert refused.exit_code == 1 and "flask billing db adopt" in refused.output

    adopted = _invoke(runtime, "adopt")
    assert adopted.exit_code == 0, adopted.output
    report = json.loads(adopted.stdout)
    assert report["rows"] == 40 and report["revision"] == db.head_revision()
    assert {"usage_submission_id", "claimed_at"} <= set(report["added_columns"])
    assert "ix_billable_events_unclaimed" in report["added_indexes"]
    assert db.current_revision(runtime.engine) == db.head_revision()

    inspector = sa.inspect(runtime.engine)
    columns = {c["name"] for c in inspector.get_columns("billable_events")}
    assert {"producer_note", "created_at", "usage_submission_id", "claimed_at"} <= columns
    assert {"usage_submissions", "billing_accounts", "webhook_events"} <= set(
        inspector.get_table_names()
    )
    # The same rows, same ids; the producer keeps inserting with its plain SQL.
    assert _produce(runtime, 2, start=40)[:40] == ids

    customers = add_accounts(runtime, [1])
    result = flush_pass(runtime)
    assert result.ok and result.events_claimed == 42
    assert emulator.billed() == {customers[1]: {"api_call": sum(range(1, 43))}}

    again = _invoke(runtime, "adopt")
    assert again.exit_code == 1 and "already managed" in again.output


def test_a_table_using_billings_own_names_is_adopted(billing_settings, emulator):
    schema = f"billing_adopt_named_{uuid.uuid4().hex[:8]}"
    admin = db.make_engine(TEST_DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = db.with_search_path(TEST_DATABASE_URL, schema)
    runtime = Runtime(billing_settings.replace(database_url=url))
    try:
        with runtime.engine.begin() as connection:
            for statement in BILLING_NAMED_TABLE.split(";"):
                connection.exec_driver_sql(statement)
        _produce(runtime, 5)
        adopted = _invoke(runtime, "adopt")
        assert adopted.exit_code == 0, adopted.output
        inspector = sa.inspect(runtime.engine)
        assert inspector.get_pk_constraint("billable_events")["name"] == "pk_billable_events"
        names = {i["name"] for i in inspector.get_indexes("billable_events")}
        assert "ix_billable_events_organization_id_occurred_at" in names
        assert "ix_billable_events_unclaimed_by_group" in names
        with runtime.engine.connect() as connection:
            assert connection.scalar(sa.text("SELECT count(*) FROM billable_events")) == 5
    finally:
        runtime.close()
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def test_a_table_off_the_contract_is_refused_and_left_untouched(producer_db, emulator):
    runtime, _ = producer_db
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE billable_events (id INTEGER PRIMARY KEY, organization_id BIGINT, "
            "event_type TEXT, quantity TEXT, occurred_at TIMESTAMP WITH TIME ZONE)"
        )
    result = _invoke(runtime, "adopt")
    assert result.exit_code == 1
    assert "missing column idempotency_key" in result.output and "Traceback" not in result.output
    assert sa.inspect(runtime.engine).get_table_names() == ["billable_events"]
    assert db.current_revision(runtime.engine) is None


def test_duplicate_idempotency_keys_refuse_adoption_and_change_nothing(producer_db, emulator):
    runtime, dialect = producer_db
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql(
            PRODUCER_TABLE[dialect]
            .replace("CONSTRAINT events_key_unique UNIQUE", "")
            .replace("NOT NULL UNIQUE", "NOT NULL")
        )
    _produce(runtime, 3)
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE billable_events SET idempotency_key = 'same'")
    result = _invoke(runtime, "adopt")
    assert result.exit_code == 1 and "duplicates" in result.output
    assert sa.inspect(runtime.engine).get_table_names() == ["billable_events"]
    columns = {c["name"] for c in sa.inspect(runtime.engine).get_columns("billable_events")}
    assert "usage_submission_id" not in columns


# The repro: the contract's columns and nothing else (no unique key, nullable columns).
MINIMAL_TABLE = {
    "postgresql": "CREATE TABLE billable_events(id bigserial primary key, organization_id bigint, "
    "event_type varchar, quantity bigint, occurred_at timestamptz, source varchar, "
    "idempotency_key varchar)",
    "sqlite": "CREATE TABLE billable_events(id INTEGER primary key, organization_id bigint, "
    "event_type varchar, quantity bigint, occurred_at timestamp, source varchar, "
    "idempotency_key varchar)",
}


def test_a_minimal_table_meeting_the_contract_is_adopted_and_billed(producer_db, emulator):
    """Adoption adds the unique index on idempotency_key once (it used to create it a second
    time from the index list read before) and the rows are then billed."""
    runtime, dialect = producer_db
    with runtime.engine.begin() as connection:
        connection.exec_driver_sql(MINIMAL_TABLE[dialect])
    _produce(runtime, 3)

    adopted = _invoke(runtime, "adopt")
    assert adopted.exit_code == 0, adopted.output
    report = json.loads(adopted.stdout)
    assert report["rows"] == 3 and report["revision"] == db.head_revision()
    assert report["added_indexes"].count("uq_billable_events_idempotency_key") == 1
    indexes = {i["name"]: i for i in sa.inspect(runtime.engine).get_indexes("billable_events")}
    assert indexes["uq_billable_events_idempotency_key"]["unique"]

    customers = add_accounts(runtime, [1])
    result = flush_pass(runtime)
    assert result.ok and result.events_claimed == 3
    assert emulator.billed() == {customers[1]: {"api_call": 1 + 2 + 3}}
