"""Entitlements keep one row per source: a Stripe refresh never touches a manual grant.

0001 made (organization_id, lookup_key) unique, so an organization could hold `saas` from Stripe or
by hand, never both: a refresh that found no Stripe entitlement would have had to delete the row an
operator granted. Now the key is (organization_id, lookup_key, source), `source` is `stripe` or
`manual`, and a manual grant may carry a note (who asked, which contract).

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD_UNIQUE = "uq_entitlements_organization_id_lookup_key"
NEW_UNIQUE = "uq_entitlements_organization_id_lookup_key_source"
SOURCE_CHECK = "ck_entitlements_source_known"


def upgrade() -> None:
    with op.batch_alter_table("entitlements") as batch:
        batch.drop_constraint(op.f(OLD_UNIQUE), type_="unique")
        # The gate's lookup (organization_id, lookup_key) uses this index's leading columns.
        batch.create_unique_constraint(
            op.f(NEW_UNIQUE), ["organization_id", "lookup_key", "source"]
        )
        batch.create_check_constraint(op.f(SOURCE_CHECK), "source IN ('stripe', 'manual')")
        batch.add_column(sa.Column("note", sa.String(500)))


def downgrade() -> None:
    connection = op.get_bind()
    both = connection.execute(
        sa.text(
            "SELECT count(*) FROM (SELECT organization_id, lookup_key FROM entitlements "
            "GROUP BY organization_id, lookup_key HAVING count(*) > 1) AS doubled"
        )
    ).scalar_one()
    if both:
        # Dropping either row would silently take access away or give it back: refuse instead.
        raise RuntimeError(
            f"cannot downgrade below 0004: {both} entitlement(s) are held both from Stripe and "
            "manually; revoke the manual grants (flask billing entitlements revoke) first"
        )
    with op.batch_alter_table("entitlements") as batch:
        batch.drop_column("note")
        batch.drop_constraint(op.f(SOURCE_CHECK), type_="check")
        batch.drop_constraint(op.f(NEW_UNIQUE), type_="unique")
        batch.create_unique_constraint(op.f(OLD_UNIQUE), ["organization_id", "lookup_key"])
