"""A missed invoice adjustment waits for an operator: carried over to the next invoice, or waived.

`invoice.created` processed after the draft was finalized (workers down or backlogged at renewal)
could not add a minimum commitment's top-up: the row is `missed`. An operator resolves it with
`flask billing adjustments carry-over` (a pending invoice item: Stripe puts it on the customer's
next invoice) or `flask billing adjustments waive --reason …`; who and why are kept here.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

MISSED = sa.text("status = 'missed'")


def upgrade() -> None:
    with op.batch_alter_table("invoice_adjustments") as batch:
        batch.add_column(sa.Column("resolved_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("resolved_by", sa.String(255)))
        batch.add_column(sa.Column("resolution_note", sa.Text()))
    # Every scrape counts the missed rows; they are few, the table is not.
    op.create_index(
        "ix_invoice_adjustments_missed",
        "invoice_adjustments",
        ["status"],
        postgresql_where=MISSED,
        sqlite_where=MISSED,
    )


def downgrade() -> None:
    resolved = (
        op.get_bind()
        .execute(sa.text("SELECT count(*) FROM invoice_adjustments WHERE resolved_at IS NOT NULL"))
        .scalar_one()
    )
    if resolved:
        raise RuntimeError(
            f"cannot downgrade below 0006: {resolved} missed adjustment(s) were resolved by an "
            "operator; downgrading would lose who resolved them and why"
        )
    op.drop_index("ix_invoice_adjustments_missed", table_name="invoice_adjustments")
    with op.batch_alter_table("invoice_adjustments") as batch:
        batch.drop_column("resolution_note")
        batch.drop_column("resolved_by")
        batch.drop_column("resolved_at")
