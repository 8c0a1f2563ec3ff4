"""Jobs count their hand-backs, so that a worker shutting down does not use up their attempts.

`attempts` counts claims and fences writes, so it still grows at every claim; a job fails
`worker_lost` only when its attempts less its hand-backs reach max_attempts. Adding a column
with a constant default is a change to the catalog alone on PostgreSQL 11+ (no table rewrite).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('hand_backs', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('hand_backs')
