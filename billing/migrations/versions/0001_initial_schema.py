"""Initial schema: billable events, billing accounts, usage outbox, webhook events, entitlements.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def _timestamps(*names: str) -> list[sa.Column]:
    return [sa.Column(name, TIMESTAMP, nullable=False) for name in names]


def upgrade() -> None:
    op.create_table(
        "billing_accounts",
        sa.Column("organization_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("stripe_customer_id", sa.String(255)),
        sa.Column("stripe_subscription_id", sa.String(255)),
        sa.Column("subscription_status", sa.String(32)),
        sa.Column("current_period_start", TIMESTAMP),
        sa.Column("current_period_end", TIMESTAMP),
        *_timestamps("created_at", "updated_at"),
        sa.PrimaryKeyConstraint("organization_id", name=op.f("pk_billing_accounts")),
        sa.UniqueConstraint(
            "stripe_customer_id", name=op.f("uq_billing_accounts_stripe_customer_id")
        ),
    )
    op.create_table(
        "entitlements",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("lookup_key", sa.String(80), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        *_timestamps("created_at", "updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entitlements")),
        sa.UniqueConstraint(
            "organization_id", "lookup_key", name=op.f("uq_entitlements_organization_id_lookup_key")
        ),
    )
    op.create_table(
        "usage_submissions",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("stripe_customer_id", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(100), nullable=False),
        sa.Column("event_name", sa.String(100), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.Column("window_start", TIMESTAMP, nullable=False),
        sa.Column("window_end", TIMESTAMP, nullable=False),
        sa.Column("identifier", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text()),
        *_timestamps("created_at", "updated_at"),
        sa.Column("sent_at", TIMESTAMP),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_submissions")),
        sa.UniqueConstraint("identifier", name=op.f("uq_usage_submissions_identifier")),
    )
    op.create_index(
        "ix_usage_submissions_organization_id_window_start",
        "usage_submissions",
        ["organization_id", "window_start"],
    )
    op.create_index(
        "ix_usage_submissions_unsent",
        "usage_submissions",
        ["created_at"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("stripe_event_id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(255), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.Column("last_traceback", sa.Text()),
        sa.Column("received_at", TIMESTAMP, nullable=False),
        sa.Column("processed_at", TIMESTAMP),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("stripe_event_id", name=op.f("uq_webhook_events_stripe_event_id")),
    )
    op.create_index(
        "ix_webhook_events_status_received_at", "webhook_events", ["status", "received_at"]
    )
    op.create_table(
        "billable_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(100), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("occurred_at", TIMESTAMP, nullable=False),
        sa.Column("source", sa.String(64)),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("usage_submission_id", sa.BigInteger()),
        sa.Column("claimed_at", TIMESTAMP),
        sa.ForeignKeyConstraint(
            ["usage_submission_id"],
            ["usage_submissions.id"],
            name=op.f("fk_billable_events_usage_submission_id_usage_submissions"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billable_events")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_billable_events_idempotency_key")),
    )
    op.create_index(
        "ix_billable_events_organization_id_occurred_at",
        "billable_events",
        ["organization_id", "occurred_at"],
    )
    # The flush scans only unclaimed rows; a partial index keeps that scan small forever.
    op.create_index(
        "ix_billable_events_unclaimed",
        "billable_events",
        ["occurred_at", "organization_id"],
        postgresql_where=sa.text("usage_submission_id IS NULL"),
        sqlite_where=sa.text("usage_submission_id IS NULL"),
    )
    # The claim reads unclaimed rows in group order (organization, type, time).
    op.create_index(
        "ix_billable_events_unclaimed_by_group",
        "billable_events",
        ["organization_id", "event_type", "occurred_at", "id"],
        postgresql_where=sa.text("usage_submission_id IS NULL"),
        sqlite_where=sa.text("usage_submission_id IS NULL"),
    )
    op.create_index(
        "ix_billable_events_usage_submission_id", "billable_events", ["usage_submission_id"]
    )


def downgrade() -> None:
    for table in (
        "billable_events",
        "webhook_events",
        "usage_submissions",
        "entitlements",
        "billing_accounts",
    ):
        op.drop_table(table)
