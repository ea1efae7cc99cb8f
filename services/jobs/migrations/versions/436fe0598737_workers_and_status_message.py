"""workers and status message: the workers heard from (heartbeats), and why a queued job waits

Revision ID: 436fe0598737
Revises: d81c57cd611f
Create Date: 2026-12-02 00:09:11.921754
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "436fe0598737"
down_revision: str | None = "d81c57cd611f"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "jobs_workers",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("gpu_type", sa.String(length=63), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("job_organization", sa.String(length=63), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lost_after_s", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("jobs_workers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_workers_last_heartbeat"), ["last_heartbeat"], unique=False)

    # Existing jobs wait for nothing in particular: both start empty.
    with op.batch_alter_table("jobs_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_message", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("requeue_note", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("jobs_jobs", schema=None) as batch_op:
        batch_op.drop_column("requeue_note")
        batch_op.drop_column("status_message")

    with op.batch_alter_table("jobs_workers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_workers_last_heartbeat"))

    op.drop_table("jobs_workers")
