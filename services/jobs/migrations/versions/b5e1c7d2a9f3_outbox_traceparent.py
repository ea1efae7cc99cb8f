"""outbox traceparent

Revision ID: b5e1c7d2a9f3
Revises: 7eaf284bd4dd
Create Date: 2026-12-02 11:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b5e1c7d2a9f3'
down_revision: str | None = '7eaf284bd4dd'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The W3C traceparent of the span that wrote the event (tuneforge_core.tracing); NULL while tracing is
    # off and for rows written before.
    with op.batch_alter_table('jobs_outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('traceparent', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs_outbox', schema=None) as batch_op:
        batch_op.drop_column('traceparent')
