"""workers that run multi-node jobs: what each worker's heartbeat says of it

Revision ID: e3a8b0c4d715
Revises: c4d9e2f17a60
Create Date: 2026-12-02 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e3a8b0c4d715"
down_revision: str | None = "c4d9e2f17a60"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Workers heard from before said nothing of it: none ran multi-node jobs until their next heartbeat.
    with op.batch_alter_table("jobs_workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("multi_node", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("jobs_workers", schema=None) as batch_op:
        batch_op.drop_column("multi_node")
