"""worker pools and job priority: what each worker's heartbeat says of its pool and GPUs, Job.priority, and
when each job was dispatched (the fair scheduler's round), and a held job's trace context

Revision ID: c4d9e2f17a60
Revises: b5e1c7d2a9f3
Create Date: 2026-12-02 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c4d9e2f17a60"
down_revision: str | None = "b5e1c7d2a9f3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Workers heard from before pools existed served the one pool there was; jobs created before
    # priorities were all NORMAL (tuneforge.v1.JobPriority 2).
    with op.batch_alter_table("jobs_workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pool", sa.String(length=40), nullable=False, server_default="default"))
        batch_op.add_column(sa.Column("gpu_memory_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("gpu_name", sa.String(length=255), nullable=False, server_default=""))
    with op.batch_alter_table("jobs_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="2"))
        batch_op.add_column(sa.Column("dispatch_time", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("assignment_traceparent", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs_jobs", schema=None) as batch_op:
        batch_op.drop_column("assignment_traceparent")
        batch_op.drop_column("dispatch_time")
        batch_op.drop_column("priority")
    with op.batch_alter_table("jobs_workers", schema=None) as batch_op:
        batch_op.drop_column("gpu_name")
        batch_op.drop_column("gpu_memory_bytes")
        batch_op.drop_column("pool")
