"""Money at the edges: exact quantities, dismissed usage, durable run records.

- `billable_events.quantity` becomes `numeric` on PostgreSQL. As `bigint`, PostgreSQL rounded a
  producer's plain-SQL `1.5` to 2 (billed 2) and `0.4` to 0 before billing could see it; as
  `numeric` the value is kept and the flush sets such a row aside as unbillable. A table adopted by
  `flask billing db adopt` keeps its producer's type (adoption marks it with a table comment).
  SQLite keeps a fraction as written already (column affinity), so nothing changes there.
- `usage_dismissals` and `billable_events.usage_dismissal_id`: rows an operator dismissed as never
  billable (`flask billing usage dismiss`), with who, when and why; a dismissed row is no longer
  pending.
- `ops_records`: the last outcome of runs that short-lived processes (cron's CLI commands) make,
  kept where every scrape can read it.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)
# Set by `flask billing db adopt` on the producer's table: its column types are the producer's.
ADOPTED_COMMENT = "billing: adopted"
DISMISSAL_FK = "fk_billable_events_usage_dismissal_id_usage_dismissals"


def _billings_quantity_type(connection: sa.Connection) -> sa.types.TypeEngine | None:
    """The type of quantity on PostgreSQL when billing owns it; None on SQLite or when adopted."""
    if connection.dialect.name != "postgresql":
        return None
    inspector = sa.inspect(connection)
    if (inspector.get_table_comment("billable_events") or {}).get("text") == ADOPTED_COMMENT:
        return None
    return {c["name"]: c["type"] for c in inspector.get_columns("billable_events")}["quantity"]


def upgrade() -> None:
    connection = op.get_bind()
    if isinstance(_billings_quantity_type(connection), sa.Integer):
        op.alter_column("billable_events", "quantity", type_=sa.Numeric(), existing_nullable=False)
    op.create_table(
        "usage_dismissals",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        # The reason the flush gave for leaving the rows unbilled, when they were dismissed.
        sa.Column("unbillable_reason", sa.String(32)),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_dismissals")),
    )
    with op.batch_alter_table("billable_events") as batch:
        batch.add_column(sa.Column("usage_dismissal_id", sa.BigInteger()))
        batch.create_foreign_key(
            DISMISSAL_FK, "usage_dismissals", ["usage_dismissal_id"], ["id"], ondelete="RESTRICT"
        )
    # Dismissed rows are few; the partial index stays as small as they are.
    op.create_index(
        "ix_billable_events_usage_dismissal_id",
        "billable_events",
        ["usage_dismissal_id"],
        postgresql_where=sa.text("usage_dismissal_id IS NOT NULL"),
        sqlite_where=sa.text("usage_dismissal_id IS NOT NULL"),
    )
    op.create_table(
        "ops_records",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_ops_records")),
    )


def downgrade() -> None:
    connection = op.get_bind()
    dismissed = connection.execute(
        sa.text("SELECT count(*) FROM billable_events WHERE usage_dismissal_id IS NOT NULL")
    ).scalar_one()
    if dismissed:
        # Dropping the link would make dismissed usage pending again: the next flush would bill it.
        raise RuntimeError(
            f"cannot downgrade below 0005: {dismissed} billable event(s) are dismissed; "
            "downgrading would bill them"
        )
    op.drop_table("ops_records")
    op.drop_index("ix_billable_events_usage_dismissal_id", table_name="billable_events")
    with op.batch_alter_table("billable_events") as batch:
        batch.drop_constraint(DISMISSAL_FK, type_="foreignkey")
        batch.drop_column("usage_dismissal_id")
    op.drop_table("usage_dismissals")
    if connection.dialect.name == "postgresql":
        fractional = connection.execute(
            sa.text("SELECT count(*) FROM billable_events WHERE quantity <> trunc(quantity)")
        ).scalar_one()
        if fractional:
            raise RuntimeError(
                f"cannot downgrade below 0005: {fractional} billable event(s) hold a fractional "
                "quantity that bigint would round"
            )
        if isinstance(_billings_quantity_type(connection), sa.Numeric):
            op.alter_column(
                "billable_events",
                "quantity",
                type_=sa.BigInteger(),
                existing_nullable=False,
                postgresql_using="quantity::bigint",
            )
