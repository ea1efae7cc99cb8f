"""a delivery whose worker was drained and handed the job back: its RESTARTED event says so, not WORKER_LOST

Revision ID: 9d4b6e1f3a27
Revises: a7d3f9c2e851
Create Date: 2026-12-08 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9d4b6e1f3a27"
down_revision: str | None = "a7d3f9c2e851"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No job was handed back before: workers did not say so until this version.
    with op.batch_alter_table("jobs_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("handed_back_attempt", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("handed_back_by", sa.String(length=255), nullable=False,
                                      server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("jobs_jobs", schema=None) as batch_op:
        batch_op.drop_column("handed_back_by")
        batch_op.drop_column("handed_back_attempt")
