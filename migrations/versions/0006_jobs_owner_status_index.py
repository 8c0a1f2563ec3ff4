"""An index on jobs by owner key and status: a key's active jobs and status-filtered listing.

With a million jobs, counting one key's queued and running jobs (the concurrency limit, at
every submit of a key that sets one) read all of that key's jobs; GET /v1/jobs?status= did
too, to find a page of them. On PostgreSQL it is built concurrently: writes to jobs go on.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from alembic import op

from migrations.online_index import create_index_online

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_index_online('ix_jobs_owner_key_id_status_id', 'jobs', ['owner_key_id', 'status', 'id'])


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_owner_key_id_status_id')
