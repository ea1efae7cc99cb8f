"""request fingerprint: what a request_id was first used for, so its reuse for other metadata is refused

Revision ID: 9d4b7e1f2a60
Revises: 3f8a6d2c1b47
Create Date: 2026-12-02 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9d4b7e1f2a60"
down_revision: str | None = "3f8a6d2c1b47"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets_datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("request_fingerprint", sa.String(length=64), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("datasets_datasets", schema=None) as batch_op:
        batch_op.drop_column("request_fingerprint")
