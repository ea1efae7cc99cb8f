"""organization locks: the limit on an organization's live deployments

Revision ID: 9c2d4a7e5f18
Revises: 3b8e6f1d2c47
Create Date: 2026-12-08 10:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9c2d4a7e5f18"
down_revision: str | None = "3b8e6f1d2c47"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One row per organization (and "#platform"), locked by CreateDeployment before it counts the live
    # deployments, so two concurrent creates never both take the last place; rows are made on first use.
    op.create_table(
        "serving_org_locks",
        sa.Column("organization", sa.String(length=63), nullable=False),
        sa.PrimaryKeyConstraint("organization"),
    )


def downgrade() -> None:
    op.drop_table("serving_org_locks")
