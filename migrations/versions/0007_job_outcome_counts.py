"""Counters of ended jobs per kind, model and status, for the gateway's /metrics.

Counting ended jobs at scrape time would read the whole jobs table; these rows are added to
as jobs end. The upgrade counts the jobs that ended before it into shard 0, by the model of
their queue (an adapter's jobs under its base model, as they are counted live; 0009 mends
databases that counted them under the adapter's id).

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
        "SELECT kind, substr(queue, length(kind) + 2), status, 0, COUNT(*) FROM jobs "  # queue: kind.model
        "WHERE status IN ('succeeded', 'failed', 'cancelled') GROUP BY kind, substr(queue, length(kind) + 2), status"
    )


def downgrade() -> None:
    op.drop_table('job_outcome_counts')
