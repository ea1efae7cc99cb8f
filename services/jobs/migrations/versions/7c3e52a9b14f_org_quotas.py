"""organization quotas: jobs held back from the work queue by their organization's running limit

Revision ID: 7c3e52a9b14f
Revises: 436fe0598737
Create Date: 2026-12-08 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7c3e52a9b14f"
down_revision: str | None = "436fe0598737"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "jobs_org_locks",
        sa.Column("organization", sa.String(length=63), nullable=False),
        sa.PrimaryKeyConstraint("organization"),
    )
    # Every existing job's assignment was published at CreateJob: all of them count as dispatched.
    with op.batch_alter_table("jobs_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dispatched", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column("assignment", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs_jobs", schema=None) as batch_op:
        batch_op.drop_column("assignment")
        batch_op.drop_column("dispatched")
    op.drop_table("jobs_org_locks")
