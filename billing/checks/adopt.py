"""`flask billing db adopt`: bring an existing `billable_events` table under billing's migrations.

A product whose `billable_events` table already exists (with rows) cannot run `db upgrade`: the
first migration creates that table. Adoption keeps the producer's table in place (its rows, ids,
sequence, grants, triggers and the producer's own columns) and adds what billing owns, in one
transaction that PostgreSQL and SQLite both roll back whole on any error:

1. check the table has the contract's upstream columns with compatible types;
2. move it aside, run migration 0001 (billing's other tables, and an empty `billable_events`),
   drop that empty table and move the producer's table back; an index or constraint of the
   producer's that carries one of 0001's names is moved out of the way meanwhile;
3. add billing's columns where missing (`created_at` with its default, `usage_submission_id` with
   its foreign key, `claimed_at`), a unique index on `idempotency_key` unless one exists, and
   billing's indexes;
4. upgrade to head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from billing import db
from billing.checks.contract import TABLE, unique_index_on, upstream_column_problems
from billing.errors import OperatorError
from billing.models import BillableEvent

ASIDE = "billable_events_adopting"
FIRST_REVISION = "0001"
MOVED = "_upstream"
# The names migration 0001 gives billable_events' indexes and constraints (0001 never changes).
UNIQUE_KEY_INDEX = "uq_billable_events_idempotency_key"
INDEX_NAMES = (
    "pk_billable_events",
    UNIQUE_KEY_INDEX,
    "ix_billable_events_organization_id_occurred_at",
    "ix_billable_events_unclaimed",
    "ix_billable_events_unclaimed_by_group",
    "ix_billable_events_usage_submission_id",
)
FOREIGN_KEY_NAME = "fk_billable_events_usage_submission_id_usage_submissions"
ADOPTED_COMMENT = "billing: adopted"  # what migration 0005 looks for


class AdoptionError(RuntimeError, OperatorError):
    """Adoption refused or failed; nothing was changed."""


@dataclass
class AdoptionReport:
    rows: int
    revision: str | None
    added_columns: list[str] = field(default_factory=list)
    added_indexes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def upgrade_database(engine: Engine, revision: str = "head") -> None:
    """`db upgrade`, refusing a database whose producer's billable_events predates billing's
    migrations: migration 0001 would fail on it, and adoption keeps its rows."""
    if db.current_revision(engine) is None and sa.inspect(engine).has_table(TABLE):
        raise AdoptionError(
            f"{TABLE} already exists and billing's migrations have never run here: "
            "adopt it with `flask billing db adopt` (keeps its rows)"
        )
    db.upgrade(engine, revision)


def adopt_billable_events(engine: Engine) -> AdoptionReport:
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN")  # pysqlite runs DDL in no transaction otherwise
        try:
            report = _adopt(connection)
        except AdoptionError:
            connection.rollback()
            raise
        except SQLAlchemyError as error:
            connection.rollback()
            raise AdoptionError(f"adoption failed, nothing was changed: {error}") from error
        connection.commit()
    return report


def _adopt(connection: Connection) -> AdoptionReport:
    current = db.revision_of(connection)
    if current is not None:
        raise AdoptionError(
            f"the database is already managed by billing's migrations (at {current}): "
            "run `flask billing db upgrade`"
        )
    inspector = sa.inspect(connection)
    if not inspector.has_table(TABLE):
        raise AdoptionError(f"there is no {TABLE} table to adopt: run `flask billing db upgrade`")
    problems = upstream_column_problems(inspector)
    if problems:
        raise AdoptionError(
            f"{TABLE} does not meet the contract ({'; '.join(problems)}): nothing was changed"
        )
    count = sa.text(f"SELECT count(*) FROM {TABLE}")
    rows = connection.scalar(count) or 0

    restore = _move_clashing_names(connection, inspector)
    connection.exec_driver_sql(f"ALTER TABLE {TABLE} RENAME TO {ASIDE}")
    db.upgrade_in(connection, FIRST_REVISION)
    connection.exec_driver_sql(f"DROP TABLE {TABLE}")
    connection.exec_driver_sql(f"ALTER TABLE {ASIDE} RENAME TO {TABLE}")
    for statement in restore:
        connection.exec_driver_sql(statement)
    if connection.dialect.name == "postgresql":
        # Later migrations leave the producer's own column types alone on an adopted table.
        connection.exec_driver_sql(f"COMMENT ON TABLE {TABLE} IS '{ADOPTED_COMMENT}'")

    report = AdoptionReport(rows=rows, revision=None)
    report.added_columns = _add_billing_columns(connection)
    report.added_indexes = _add_billing_indexes(connection)
    db.upgrade_in(connection, "head")
    if connection.scalar(count) != rows:  # cannot happen; money depends on it, so check
        raise AdoptionError("row count changed during adoption: nothing was changed")
    report.revision = db.revision_of(connection)
    return report


def _move_clashing_names(connection: Connection, inspector: sa.Inspector) -> list[str]:
    """Free the names 0001 is about to use; returns the statements that give them back."""
    postgresql = connection.dialect.name == "postgresql"
    restore: list[str] = []
    indexes = {i["name"] for i in inspector.get_indexes(TABLE)}
    pk = inspector.get_pk_constraint(TABLE).get("name")
    uniques = {u["name"] for u in inspector.get_unique_constraints(TABLE)}
    for name in INDEX_NAMES:
        if name not in indexes | uniques | {pk}:
            continue
        if postgresql:  # renaming a constraint's index renames the constraint too
            connection.exec_driver_sql(f'ALTER INDEX "{name}" RENAME TO "{name}{MOVED}"')
            restore.append(f'ALTER INDEX "{name}{MOVED}" RENAME TO "{name}"')
        elif name in indexes:  # SQLite: only indexes are schema-wide names
            sql = connection.scalar(
                sa.text("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :n"),
                {"n": name},
            )
            connection.exec_driver_sql(f'DROP INDEX "{name}"')
            restore.append(sql)
    foreign_keys = {f["name"] for f in inspector.get_foreign_keys(TABLE)}
    if postgresql and FOREIGN_KEY_NAME in foreign_keys:
        connection.exec_driver_sql(
            f'ALTER TABLE {TABLE} RENAME CONSTRAINT "{FOREIGN_KEY_NAME}" '
            f'TO "{FOREIGN_KEY_NAME}{MOVED}"'
        )
        restore.append(
            f'ALTER TABLE {TABLE} RENAME CONSTRAINT "{FOREIGN_KEY_NAME}{MOVED}" '
            f'TO "{FOREIGN_KEY_NAME}"'
        )
    return restore


def _add_billing_columns(connection: Connection) -> list[str]:
    dialect = connection.dialect
    timestamp = sa.DateTime(timezone=True).compile(dialect=dialect)
    present = {c["name"] for c in sa.inspect(connection).get_columns(TABLE)}
    added = []
    if "created_at" not in present:
        if dialect.name == "postgresql":  # a constant default: no table rewrite
            connection.exec_driver_sql(
                f"ALTER TABLE {TABLE} ADD COLUMN created_at {timestamp} "
                "NOT NULL DEFAULT CURRENT_TIMESTAMP"
            )
        else:  # SQLite adds no column with a non-constant default; migration 0002 sets it
            connection.exec_driver_sql(f"ALTER TABLE {TABLE} ADD COLUMN created_at {timestamp}")
        added.append("created_at")
    # 0002 makes created_at NOT NULL with a default: fill what the producer left empty.
    connection.exec_driver_sql(
        f"UPDATE {TABLE} SET created_at = CURRENT_TIMESTAMP WHERE created_at IS NULL"
    )
    if "usage_submission_id" not in present:
        connection.exec_driver_sql(
            f"ALTER TABLE {TABLE} ADD COLUMN usage_submission_id "
            f"{sa.BigInteger().compile(dialect=dialect)} CONSTRAINT {FOREIGN_KEY_NAME} "
            "REFERENCES usage_submissions (id) ON DELETE RESTRICT"
        )
        added.append("usage_submission_id")
    if "claimed_at" not in present:
        connection.exec_driver_sql(f"ALTER TABLE {TABLE} ADD COLUMN claimed_at {timestamp}")
        added.append("claimed_at")
    return added


def _add_billing_indexes(connection: Connection) -> list[str]:
    inspector = sa.inspect(connection)
    present = {i["name"] for i in inspector.get_indexes(TABLE)}
    added = []
    if unique_index_on(inspector, "idempotency_key") is None:
        # Plain DDL: an `sa.Index` on the model's table would join `table.indexes` for the rest
        # of the process, so the loop below created it a second time.
        try:
            connection.exec_driver_sql(
                f'CREATE UNIQUE INDEX "{UNIQUE_KEY_INDEX}" ON {TABLE} (idempotency_key)'
            )
        except sa.exc.IntegrityError as error:
            raise AdoptionError(
                "idempotency_key holds duplicates; the contract needs it unique (a retried write "
                "must never bill twice): remove the duplicates, then adopt again; nothing was "
                "changed"
            ) from error
        added.append(UNIQUE_KEY_INDEX)
    for index in BillableEvent.__table__.indexes:
        # Revision 0001's indexes only: later migrations add their own (and their columns).
        if index.name in INDEX_NAMES and index.name not in present:
            index.create(connection)
            added.append(str(index.name))
    return added
