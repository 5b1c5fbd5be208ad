import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError

from billing import db
from billing.models import (
    BillableEvent,
    BillingAccount,
    Entitlement,
    UsageCorrection,
    UsageSubmission,
    WebhookEvent,
)
from tests.conftest import TEST_DATABASE_URL

BILLING_TABLES = {
    "billable_events",
    "billing_accounts",
    "usage_submissions",
    "webhook_events",
    "entitlements",
    "billing_adjustments",
    "invoice_adjustments",
}
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _tables(engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def _round_trip(engine) -> None:
    assert db.current_revision(engine) is None
    db.upgrade(engine)
    assert db.current_revision(engine) == db.head_revision()
    assert _tables(engine) >= BILLING_TABLES
    db.downgrade(engine, "base")
    assert db.current_revision(engine) is None
    assert not (_tables(engine) & BILLING_TABLES)


def test_sqlite_file_upgrades_to_head_and_back(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'billing.db'}")
    _round_trip(engine)
    engine.dispose()


def test_blank_postgresql_schema_upgrades_to_head_and_back():
    # A name of its own: other test runs on this PostgreSQL run the same test at the same time.
    schema = f"billing_migration_roundtrip_{uuid.uuid4().hex[:8]}"
    admin = db.make_engine(TEST_DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    engine = db.make_engine(db.with_search_path(TEST_DATABASE_URL, schema))
    try:
        _round_trip(engine)
        indexes = {}
        db.upgrade(engine)
        for index in sa.inspect(engine).get_indexes("billable_events"):
            indexes[index["name"]] = index
        assert "ix_billable_events_unclaimed" in indexes
        assert "usage_submission_id IS NULL" in str(
            indexes["ix_billable_events_unclaimed"]["dialect_options"]["postgresql_where"]
        )
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def _event(key: str) -> BillableEvent:
    return BillableEvent(
        organization_id=1, event_type="api_call", quantity=1, occurred_at=NOW, idempotency_key=key
    )


def _submission(identifier: str) -> UsageSubmission:
    return UsageSubmission(
        organization_id=1,
        stripe_customer_id="cus_1",
        event_type="api_call",
        event_name="api_call",
        value=1,
        event_count=1,
        window_start=NOW,
        window_end=NOW,
        identifier=identifier,
    )


DUPLICATES = [
    ("billable event idempotency key", lambda: [_event("k1"), _event("k1")]),
    ("outbox identifier", lambda: [_submission("i1"), _submission("i1")]),
    (
        "webhook event id",
        lambda: [WebhookEvent(stripe_event_id="evt_1", type="x", payload={}) for _ in range(2)],
    ),
    (
        "stripe customer of two organizations",
        lambda: [
            BillingAccount(organization_id=1, stripe_customer_id="cus_1"),
            BillingAccount(organization_id=2, stripe_customer_id="cus_1"),
        ],
    ),
    (
        "entitlement per organization, lookup key and source",
        lambda: [
            Entitlement(organization_id=1, lookup_key="saas", source="manual") for _ in range(2)
        ],
    ),
]


@pytest.mark.parametrize(("what", "rows"), DUPLICATES, ids=[d[0] for d in DUPLICATES])
def test_postgresql_rejects_duplicates(db_engine, what, rows):
    first, second = rows()
    factory = db.make_session_factory(db_engine)
    with factory.begin() as session:
        session.add(first)
    with pytest.raises(IntegrityError), factory.begin() as session:
        session.add(second)
    with factory() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(type(first))) == 1


def test_timestamps_come_back_timezone_aware_utc(db_engine, tmp_path):
    for engine in (db_engine, db.make_engine(f"sqlite:///{tmp_path / 'tz.db'}")):
        if engine is not db_engine:
            db.upgrade(engine)
        factory = db.make_session_factory(engine)
        with factory.begin() as session:
            session.add(_event("tz"))
        with factory() as session:
            stored = session.scalar(sa.select(BillableEvent.occurred_at))
        assert stored == NOW and stored.tzinfo is not None


def test_naive_datetimes_are_refused(db_engine):
    factory = db.make_session_factory(db_engine)
    event = _event("naive")
    event.occurred_at = datetime(2026, 11, 25, 12, 0)
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), factory.begin() as session:
        session.add(event)


def test_an_entitlement_may_come_from_stripe_and_by_hand_at_once(db_engine):
    factory = db.make_session_factory(db_engine)
    with factory.begin() as session:
        for source in ("stripe", "manual"):
            session.add(Entitlement(organization_id=1, lookup_key="saas", source=source))
    with pytest.raises(IntegrityError), factory.begin() as session:
        session.add(Entitlement(organization_id=1, lookup_key="saas", source="guess"))


@contextlib.contextmanager
def blank_engine(tmp_path, url: str, name: str) -> Iterator[sa.Engine]:
    """An empty SQLite file or PostgreSQL schema of its own, dropped afterwards."""
    if url == "sqlite":
        engine = db.make_engine(f"sqlite:///{tmp_path / 'down.db'}")
        try:
            yield engine
        finally:
            engine.dispose()
        return
    schema = f"billing_{name}_{tmp_path.name[-8:].lower()}".replace("-", "_")
    admin = db.make_engine(TEST_DATABASE_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    engine = db.make_engine(db.with_search_path(TEST_DATABASE_URL, schema))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.mark.parametrize("url", ["sqlite", "postgresql"])
def test_0004_downgrade_refuses_to_merge_two_sources(tmp_path, url):
    """Below 0004 one row per key: dropping either source would change who has access."""
    with blank_engine(tmp_path, url, "0004_down") as engine:
        _downgrade_0004(engine)


def _downgrade_0004(engine: sa.Engine) -> None:
    below_0004 = ScriptDirectory(str(db.MIGRATIONS_DIR)).get_revision("0004").down_revision
    # At 0004 itself: SQLite does not roll back DDL, so a later revision's downgrade, run
    # first on the way down, would stay applied when 0004's refuses.
    db.upgrade(engine, "0004")
    factory = db.make_session_factory(engine)
    with factory.begin() as session:
        for source in ("stripe", "manual"):
            session.add(Entitlement(organization_id=1, lookup_key="saas", source=source))
    with pytest.raises(RuntimeError, match="held both from Stripe and manually"):
        db.downgrade(engine, below_0004)
    assert db.current_revision(engine) == "0004"
    with factory.begin() as session:
        session.execute(sa.delete(Entitlement).where(Entitlement.source == "manual"))
    db.downgrade(engine, below_0004)
    assert db.current_revision(engine) == below_0004
    with engine.connect() as connection:
        kept = connection.execute(sa.text("SELECT source FROM entitlements")).scalars().all()
    assert kept == ["stripe"]


@pytest.mark.parametrize("url", ["sqlite", "postgresql"])
def test_0008_downgrade_refuses_while_corrections_exist(tmp_path, url):
    """Below 0008 what was corrected, by whom and why would be lost."""
    with blank_engine(tmp_path, url, "0008_down") as engine:
        db.upgrade(engine, "0008")
        factory = db.make_session_factory(engine)
        with factory.begin() as session:
            session.add(
                UsageCorrection(
                    idempotency_key="k",
                    source="operator",
                    organization_id=1,
                    event_type="api_call",
                    hour=NOW,
                    delta=-1,
                    reason="test",
                    actor="me",
                    billed_before=3,
                )
            )
        with pytest.raises(IntegrityError), factory.begin() as session:  # delta <> 0
            session.add(
                UsageCorrection(
                    idempotency_key="zero",
                    source="operator",
                    organization_id=1,
                    event_type="api_call",
                    hour=NOW,
                    delta=0,
                    reason="test",
                    actor="me",
                    billed_before=3,
                )
            )
        with pytest.raises(RuntimeError, match="1 usage correction row"):
            db.downgrade(engine, "0007")
        assert db.current_revision(engine) == "0008"
        with factory.begin() as session:
            session.execute(sa.delete(UsageCorrection))
        db.downgrade(engine, "0007")
        assert db.current_revision(engine) == "0007"
        assert not {"usage_corrections", "billable_event_corrections"} & _tables(engine)
