"""the request_id of a deleted deployment

Revision ID: 5e7a1c9d3b62
Revises: 9c2d4a7e5f18
Create Date: 2026-12-08 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5e7a1c9d3b62"
down_revision: str | None = "9c2d4a7e5f18"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The CreateDeployment request_id and request hash of a deleted deployment, so that a create retried
    # with that request_id (in the same organization) is told the deployment was deleted instead of making
    # it again; NULL for deployments deleted before, whose request_ids stay free as they were.
    with op.batch_alter_table("serving_deleted_deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_id", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=False, server_default=""))
        batch_op.create_index("ix_serving_deleted_org_request_id", ["organization", "request_id"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("serving_deleted_deployments", schema=None) as batch_op:
        batch_op.drop_index("ix_serving_deleted_org_request_id")
        batch_op.drop_column("request_hash")
        batch_op.drop_column("request_id")
