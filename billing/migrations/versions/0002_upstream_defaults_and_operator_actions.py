"""Upstream-friendly billable_events, outbox key generations, operator actions.

- `billable_events.created_at` gets a database default: a producer that inserts only the
  contract's columns with plain SQL succeeds (every other column not in the contract is nullable
  or an identity).
- `usage_submissions.key_generation`: the next send after a refusal is a new request;
  `last_error_scope`: what the last refusal was about (run, meter, customer, row).
- `ix_usage_submissions_awaiting_operator`: every flush counts failed and held rows.
- `usage_submission_actions`: the audit trail of `flask billing submissions retry|write-off`.

Revision ID: 0002
Revises: 0004
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0004"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)
AWAITING_OPERATOR = sa.text("status IN ('failed', 'held')")


def _set_created_at_default(default: sa.TextClause | None) -> None:
    # SQLite cannot alter a column: batch mode rebuilds the table (rows and indexes kept).
    with op.batch_alter_table("billable_events") as batch:
        # nullable=False restated: an adopted table's own created_at gets it too (`db adopt`).
        batch.alter_column(
            "created_at", existing_type=TIMESTAMP, nullable=False, server_default=default
        )


def upgrade() -> None:
    _set_created_at_default(sa.text("CURRENT_TIMESTAMP"))
    op.add_column(
        "usage_submissions",
        sa.Column("key_generation", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column("usage_submissions", sa.Column("last_error_scope", sa.String(16)))
    op.create_index(
        "ix_usage_submissions_awaiting_operator",
        "usage_submissions",
        ["status"],
        postgresql_where=AWAITING_OPERATOR,
        sqlite_where=AWAITING_OPERATOR,
    )
    op.create_table(
        "usage_submission_actions",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("submission_id", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("previous_status", sa.String(16), nullable=False),
        sa.Column("new_status", sa.String(16), nullable=False),
        sa.Column("previous_error", sa.Text()),
        sa.Column("previous_identifier", sa.String(100)),
        sa.Column("reason", sa.Text()),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["submission_id"],
            ["usage_submissions.id"],
            name=op.f("fk_usage_submission_actions_submission_id_usage_submissions"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_submission_actions")),
    )
    op.create_index(
        "ix_usage_submission_actions_submission_id", "usage_submission_actions", ["submission_id"]
    )


def downgrade() -> None:
    op.drop_table("usage_submission_actions")
    op.drop_index("ix_usage_submissions_awaiting_operator", table_name="usage_submissions")
    # Plain DROP COLUMN (SQLite >= 3.35 too): rebuilding this referenced table is not needed.
    op.drop_column("usage_submissions", "last_error_scope")
    op.drop_column("usage_submissions", "key_generation")
    _set_created_at_default(None)
