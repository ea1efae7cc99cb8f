"""the request hash of a deployment

Revision ID: 3b8e6f1d2c47
Revises: fd70634b7b02
Create Date: 2026-12-08 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3b8e6f1d2c47"
down_revision: str | None = "fd70634b7b02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The SHA-256 of the CreateDeploymentRequest that made each deployment, so that another request under
    # the same request_id is refused (ALREADY_EXISTS, REQUEST_ID_REUSED) instead of answered with this
    # deployment. Rows made before have "": nothing is known of their request, so a retry under their
    # request_id is treated as matching and answered with the deployment, as it was before.
    with op.batch_alter_table("serving_deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("serving_deployments", schema=None) as batch_op:
        batch_op.drop_column("request_hash")
