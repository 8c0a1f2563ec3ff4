"""Counters of ended jobs per kind, model and status, for the gateway's /metrics.

Counting ended jobs at scrape time would read the whole jobs table; these rows are added to
as jobs end. The upgrade counts the jobs that ended before it into shard 0.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job_outcome_counts',
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('shard', sa.Integer(), nullable=False),
        sa.Column('jobs', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('kind', 'model', 'status', 'shard', name=op.f('pk_job_outcome_counts')),
    )
    op.execute(
        "INSERT INTO job_outcome_counts (kind, model, status, shard, jobs) "
        "SELECT kind, model, status, 0, COUNT(*) FROM jobs "
        "WHERE status IN ('succeeded', 'failed', 'cancelled') GROUP BY kind, model, status"
    )


def downgrade() -> None:
    op.drop_table('job_outcome_counts')
