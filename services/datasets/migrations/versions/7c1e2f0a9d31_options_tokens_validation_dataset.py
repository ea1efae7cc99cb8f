"""dataset options, token statistics, max-samples count and a separate validation dataset

Revision ID: 7c1e2f0a9d31
Revises: 50b736b9a65a
Create Date: 2026-11-21 06:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7c1e2f0a9d31"
down_revision: str | None = "50b736b9a65a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets_datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("dropped_by_max_samples", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("token_statistics", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("options", sa.LargeBinary(), nullable=False, server_default=""))
        batch_op.add_column(
            sa.Column("validation_dataset_id", sa.String(length=40), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("datasets_datasets", schema=None) as batch_op:
        batch_op.drop_column("validation_dataset_id")
        batch_op.drop_column("options")
        batch_op.drop_column("token_statistics")
        batch_op.drop_column("dropped_by_max_samples")
