"""job usage: the jobs that use each dataset, kept from the JobChanged events

Revision ID: 3f8a6d2c1b47
Revises: 7c1e2f0a9d31
Create Date: 2026-12-01 23:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3f8a6d2c1b47"
down_revision: str | None = "7c1e2f0a9d31"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "datasets_job_usage",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("organization", sa.String(length=63), nullable=False),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("validation_dataset_id", sa.String(length=40), nullable=False),
        sa.Column("ended", sa.Boolean(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_datasets_job_usage")),
    )
    with op.batch_alter_table("datasets_job_usage", schema=None) as batch_op:
        batch_op.create_index("ix_datasets_job_usage_org_dataset", ["organization", "dataset_id"])
        batch_op.create_index(
            "ix_datasets_job_usage_org_validation_dataset", ["organization", "validation_dataset_id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("datasets_job_usage", schema=None) as batch_op:
        batch_op.drop_index("ix_datasets_job_usage_org_validation_dataset")
        batch_op.drop_index("ix_datasets_job_usage_org_dataset")
    op.drop_table("datasets_job_usage")
