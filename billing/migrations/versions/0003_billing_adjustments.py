"""Billing adjustments (minimum commitments, one-off credits) and what each invoice received.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "billing_adjustments",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("consumed_invoice_id", sa.String(255)),
        sa.Column("removed_at", TIMESTAMP),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_adjustments")),
    )
    op.create_index(
        "ix_billing_adjustments_organization_id", "billing_adjustments", ["organization_id"]
    )
    op.create_table(
        "invoice_adjustments",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("stripe_invoice_id", sa.String(255), nullable=False),
        sa.Column("adjustment_id", sa.BigInteger(), nullable=False),
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("metered_usage_cents", sa.BigInteger()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stripe_invoice_item_id", sa.String(255)),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("applied_at", TIMESTAMP),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoice_adjustments")),
        sa.ForeignKeyConstraint(
            ["adjustment_id"],
            ["billing_adjustments.id"],
            name=op.f("fk_invoice_adjustments_adjustment_id_billing_adjustments"),
            ondelete="RESTRICT",
        ),
        sa.UniqueConstraint(
            "stripe_invoice_id",
            "adjustment_id",
            name=op.f("uq_invoice_adjustments_stripe_invoice_id_adjustment_id"),
        ),
    )


def downgrade() -> None:
    op.drop_table("invoice_adjustments")
    op.drop_index("ix_billing_adjustments_organization_id", table_name="billing_adjustments")
    op.drop_table("billing_adjustments")
