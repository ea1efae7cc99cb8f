"""what a deleted job used, kept in its tombstone for GetUsage

Revision ID: a7d3f9c2e851
Revises: f2b7d4e9c1a3
Create Date: 2026-12-07 03:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a7d3f9c2e851"
down_revision: str | None = "f2b7d4e9c1a3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A deleted job's final state, times and usage, so that GetUsage keeps counting what it used; NULL
    # state for jobs deleted before (not counted: their usage is gone).
    with op.batch_alter_table("jobs_deletions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("state", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("create_time", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("end_time", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("usage_gpu_count", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("usage_run_seconds", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("usage_cost_usd", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("usage_tokens", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.create_index("ix_jobs_deletions_org_end_time", ["organization", "end_time"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs_deletions", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_deletions_org_end_time")
        for column in ("usage_tokens", "usage_cost_usd", "usage_run_seconds", "usage_gpu_count", "end_time",
                       "create_time", "state"):
            batch_op.drop_column(column)
