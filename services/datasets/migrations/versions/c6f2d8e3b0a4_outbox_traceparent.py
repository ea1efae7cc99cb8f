"""outbox traceparent

Revision ID: c6f2d8e3b0a4
Revises: ac0a429ed07f
Create Date: 2026-12-02 11:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'c6f2d8e3b0a4'
down_revision: str | None = 'ac0a429ed07f'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The W3C traceparent of the span that wrote the event (tuneforge_core.tracing); NULL while tracing is
    # off and for rows written before.
    with op.batch_alter_table('datasets_outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('traceparent', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('datasets_outbox', schema=None) as batch_op:
        batch_op.drop_column('traceparent')
