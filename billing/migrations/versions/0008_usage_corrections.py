"""Usage corrections: retract or restate billed usage, as a record, applied once by the flush.

`usage_corrections` holds every correction (operator's `flask billing usage correct`, or a
producer's row), `usage_correction_cancels` the meter events a correction asked Stripe to cancel
and the answers, and `billable_event_corrections` is the upstream table a producer writes with
plain SQL (the contract in `billing/checks/contract.py`). The outbox gains two statuses,
`cancelling` and `cancelled` (a string column: no schema change).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

OPEN = sa.text("status IN ('requested', 'cancelling', 'sending', 'held')")
PENDING_UPSTREAM = sa.text("usage_correction_id IS NULL AND rejected_reason IS NULL")


def _id() -> sa.Column:
    # SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
    return sa.Column(
        "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, nullable=False
    )


def _at(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "usage_corrections",
        _id(),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(100), nullable=False),
        _at("hour", nullable=False),
        sa.Column("delta", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("method", sa.String(32)),
        sa.Column("billed_before", sa.BigInteger(), nullable=False),
        sa.Column(
            "submission_id",
            sa.BigInteger(),
            sa.ForeignKey(
                "usage_submissions.id",
                name=op.f("fk_usage_corrections_submission_id_usage_submissions"),
                ondelete="RESTRICT",
            ),
        ),
        sa.Column(
            "billing_adjustment_id",
            sa.BigInteger(),
            sa.ForeignKey(
                "billing_adjustments.id",
                name=op.f("fk_usage_corrections_billing_adjustment_id_billing_adjustments"),
                ondelete="RESTRICT",
            ),
        ),
        sa.Column("last_error", sa.Text()),
        _at("created_at", nullable=False),
        _at("updated_at", nullable=False),
        _at("applied_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_corrections")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_usage_corrections_idempotency_key")),
        sa.CheckConstraint("delta <> 0", name=op.f("ck_usage_corrections_delta_not_zero")),
    )
    op.create_index(
        "ix_usage_corrections_open",
        "usage_corrections",
        ["status"],
        postgresql_where=OPEN,
        sqlite_where=OPEN,
    )
    op.create_index(
        "ix_usage_corrections_group",
        "usage_corrections",
        ["organization_id", "event_type", "hour"],
    )
    op.create_index("ix_usage_corrections_submission_id", "usage_corrections", ["submission_id"])
    op.create_table(
        "usage_correction_cancels",
        _id(),
        sa.Column(
            "correction_id",
            sa.BigInteger(),
            sa.ForeignKey(
                "usage_corrections.id",
                name=op.f("fk_usage_correction_cancels_correction_id_usage_corrections"),
                ondelete="RESTRICT",
            ),
            nullable=False,
        ),
        sa.Column(
            "submission_id",
            sa.BigInteger(),
            sa.ForeignKey(
                "usage_submissions.id",
                name=op.f("fk_usage_correction_cancels_submission_id_usage_submissions"),
                ondelete="RESTRICT",
            ),
            nullable=False,
        ),
        sa.Column("event_name", sa.String(100), nullable=False),
        sa.Column("identifier", sa.String(100), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _at("first_attempt_at"),
        _at("last_attempt_at"),
        _at("cancelled_at"),
        sa.Column("last_error", sa.Text()),
        _at("created_at", nullable=False),
        _at("updated_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_correction_cancels")),
        sa.UniqueConstraint(
            "correction_id",
            "submission_id",
            name=op.f("uq_usage_correction_cancels_correction_id_submission_id"),
        ),
    )
    op.create_index(
        "ix_usage_correction_cancels_submission_id",
        "usage_correction_cancels",
        ["submission_id"],
    )
    op.create_table(
        "billable_event_corrections",
        _id(),
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(100), nullable=False),
        _at("hour", nullable=False),
        # numeric, as billable_events.quantity (0005): a fraction is seen, not rounded.
        sa.Column("delta", sa.Numeric().with_variant(sa.BigInteger(), "sqlite"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("source", sa.String(64)),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.Column(
            "usage_correction_id",
            sa.BigInteger(),
            sa.ForeignKey(
                "usage_corrections.id",
                name=op.f("fk_billable_event_corrections_usage_correction_id"),
                ondelete="RESTRICT",
            ),
        ),
        sa.Column("rejected_reason", sa.Text()),
        _at("taken_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billable_event_corrections")),
        sa.UniqueConstraint(
            "idempotency_key", name=op.f("uq_billable_event_corrections_idempotency_key")
        ),
    )
    # The flush reads the pending rows only; the partial index keeps that small forever.
    op.create_index(
        "ix_billable_event_corrections_pending",
        "billable_event_corrections",
        ["id"],
        postgresql_where=PENDING_UPSTREAM,
        sqlite_where=PENDING_UPSTREAM,
    )


def downgrade() -> None:
    bind = op.get_bind()
    recorded = sum(
        bind.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
        for table in ("usage_corrections", "billable_event_corrections")
    )
    if recorded:
        raise RuntimeError(
            f"cannot downgrade below 0008: {recorded} usage correction row(s) exist; downgrading "
            "would lose what was corrected, by whom and why (and leave outbox rows `cancelled`)"
        )
    op.drop_index("ix_billable_event_corrections_pending", table_name="billable_event_corrections")
    op.drop_table("billable_event_corrections")
    op.drop_index(
        "ix_usage_correction_cancels_submission_id", table_name="usage_correction_cancels"
    )
    op.drop_table("usage_correction_cancels")
    op.drop_index("ix_usage_corrections_submission_id", table_name="usage_corrections")
    op.drop_index("ix_usage_corrections_group", table_name="usage_corrections")
    op.drop_index("ix_usage_corrections_open", table_name="usage_corrections")
    op.drop_table("usage_corrections")
