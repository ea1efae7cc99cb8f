"""the request_id of a deleted job

Revision ID: f2b7d4e9c1a3
Revises: e3a8b0c4d715
Create Date: 2026-12-05 22:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f2b7d4e9c1a3"
down_revision: str | None = "e3a8b0c4d715"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The CreateJob request_id and request hash of a deleted job, so that a create retried with that
    # request_id is told the job was deleted instead of making it again; NULL for jobs deleted before.
    with op.batch_alter_table("jobs_deletions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_id", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=False, server_default=""))
        batch_op.create_index("ix_jobs_deletions_org_request_id", ["organization", "request_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs_deletions", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_deletions_org_request_id")
        batch_op.drop_column("request_hash")
        batch_op.drop_column("request_id")
