"""Leases, heartbeats, queue deadlines, publish times and idempotent submits on jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker_device', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('request_hash', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_jobs_status_enqueued_at', ['status', 'enqueued_at'], unique=False)
        batch_op.create_index('ix_jobs_status_expires_at', ['status', 'expires_at'], unique=False)
        batch_op.create_index('ix_jobs_status_lease_expires_at', ['status', 'lease_expires_at'], unique=False)
    # Jobs left running by code without leases get a lapsed one, so the reaper recovers them.
    # The column holds naive UTC; PostgreSQL's CURRENT_TIMESTAMP would come out in the session's
    # time zone (9 h ahead in Tokyo: a lease the reaper would leave alone until then).
    now = "timezone('UTC', CURRENT_TIMESTAMP)" if op.get_bind().dialect.name == "postgresql" else "CURRENT_TIMESTAMP"
    op.execute(f"UPDATE jobs SET lease_expires_at = {now} WHERE status = 'running' AND lease_expires_at IS NULL")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_status_lease_expires_at')
        batch_op.drop_index('ix_jobs_status_expires_at')
        batch_op.drop_index('ix_jobs_status_enqueued_at')
        batch_op.drop_column('request_hash')
        batch_op.drop_column('expires_at')
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('worker_device')

