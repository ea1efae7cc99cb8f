"""longest example bytes: DatasetStatistics.longest_example_bytes (0 for the datasets made before it)

Revision ID: d3a9c5e71f08
Revises: c6f2d8e3b0a4
Create Date: 2026-12-06 06:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d3a9c5e71f08"
down_revision: str | None = "c6f2d8e3b0a4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets_datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("longest_example_bytes", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("datasets_datasets", schema=None) as batch_op:
        batch_op.drop_column("longest_example_bytes")
