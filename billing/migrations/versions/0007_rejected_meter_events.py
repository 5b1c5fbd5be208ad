"""Meter events Stripe refused asynchronously: the `rejected` outbox status and the error reports.

Live Stripe answers a well-formed meter event 200 and checks the customer, the value and the meter
later; what fails is reported in a meter error report (a thin v2 event). Its rows become
`rejected` (an operator re-queues them with a new identifier once the cause is fixed).

- `ix_usage_submissions_awaiting_operator` counts `rejected` too (every flush reads it).
- `ix_usage_submissions_sent_by_meter`: the rows of one meter sent in a time window, what a report
  whose samples are not all its errors is reconciled against.
- `ix_usage_submission_actions_previous_identifier`: a sample naming an identifier a re-queue
  replaced is found by it.
- `meter_error_reports`: each report once per Stripe event id, its samples as mapped, and whether
  the errors it did not sample have been looked for.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)
AWAITING_OPERATOR_INDEX = "ix_usage_submissions_awaiting_operator"
AWAITING_OPERATOR = sa.text("status IN ('failed', 'held', 'rejected')")
AWAITING_OPERATOR_BEFORE = sa.text("status IN ('failed', 'held')")
SENT = sa.text("status = 'sent'")
REISSUED = sa.text("action = 'reissue'")
UNRECONCILED = sa.text("reconciled_at IS NULL")


def _awaiting_operator_index(where: sa.TextClause) -> None:
    op.drop_index(AWAITING_OPERATOR_INDEX, table_name="usage_submissions")
    op.create_index(
        AWAITING_OPERATOR_INDEX,
        "usage_submissions",
        ["status"],
        postgresql_where=where,
        sqlite_where=where,
    )


def upgrade() -> None:
    _awaiting_operator_index(AWAITING_OPERATOR)
    op.create_index(
        "ix_usage_submissions_sent_by_meter",
        "usage_submissions",
        ["event_name", "sent_at"],
        postgresql_where=SENT,
        sqlite_where=SENT,
    )
    op.create_index(
        "ix_usage_submission_actions_previous_identifier",
        "usage_submission_actions",
        ["previous_identifier"],
        postgresql_where=REISSUED,
        sqlite_where=REISSUED,
    )
    op.create_table(
        "meter_error_reports",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("stripe_event_id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(255), nullable=False),
        sa.Column("meter_id", sa.String(255)),
        sa.Column("event_name", sa.String(100)),
        sa.Column("validation_start", TIMESTAMP),
        sa.Column("validation_end", TIMESTAMP),
        sa.Column("error_count", sa.Integer(), nullable=False),
        sa.Column("sampled", sa.Integer(), nullable=False),
        sa.Column("matched", sa.Integer(), nullable=False),
        sa.Column("summary", sa.Text()),
        sa.Column("samples", sa.JSON(), nullable=False),
        sa.Column("reconciled_at", TIMESTAMP),
        sa.Column("result", sa.JSON()),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_meter_error_reports")),
        sa.UniqueConstraint("stripe_event_id", name=op.f("uq_meter_error_reports_stripe_event_id")),
    )
    op.create_index(
        "ix_meter_error_reports_unreconciled",
        "meter_error_reports",
        ["validation_end"],
        postgresql_where=UNRECONCILED,
        sqlite_where=UNRECONCILED,
    )


def downgrade() -> None:
    rejected = (
        op.get_bind()
        .execute(sa.text("SELECT count(*) FROM usage_submissions WHERE status = 'rejected'"))
        .scalar_one()
    )
    if rejected:
        raise RuntimeError(
            f"cannot downgrade below 0007: {rejected} usage submission(s) are rejected, a status "
            "the older code does not know; retry or write them off first"
        )
    op.drop_index("ix_meter_error_reports_unreconciled", table_name="meter_error_reports")
    op.drop_table("meter_error_reports")
    op.drop_index(
        "ix_usage_submission_actions_previous_identifier", table_name="usage_submission_actions"
    )
    op.drop_index("ix_usage_submissions_sent_by_meter", table_name="usage_submissions")
    _awaiting_operator_index(AWAITING_OPERATOR_BEFORE)
