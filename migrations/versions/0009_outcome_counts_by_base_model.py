"""Ended-job counters name base models only: 0007 counted an adapter's jobs under the adapter's id.

0007's count of the jobs that ended before it grouped by `jobs.model`, which holds the adapter's
id for a generation on an adapter, while jobs ending later are counted under the base model of
their queue. /metrics then showed one series per adapter (labels that grow without bound, on
an unauthenticated page) and split each base model's count in two. This moves every adapter's
count into its base model's row, in the same shard. Data only; nothing to undo on downgrade.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

ADAPTER_PREFIX = 'ft-'  # services.domain.adapters.ADAPTER_PREFIX; migrations do not import the app


def upgrade() -> None:
    bind = op.get_bind()
    prefix = {"prefix": ADAPTER_PREFIX + "%"}
    counted = bind.execute(sa.text(
        "SELECT kind, model, status, shard, jobs FROM job_outcome_counts WHERE model LIKE :prefix"), prefix).all()
    if not counted:
        return
    # Each adapter's base model is in the queue of its jobs (kind.model): one pass over jobs.
    base_of = dict(((kind, model), base) for kind, model, base in bind.execute(sa.text(
        "SELECT DISTINCT kind, model, substr(queue, length(kind) + 2) FROM jobs WHERE model LIKE :prefix"), prefix))
    # Rows in one order, as a worker's upserts of the same counters may run meanwhile.
    for kind, adapter_id, status, shard, jobs in sorted(counted):
        base = base_of.get((kind, adapter_id))
        if base is None:
            continue  # no job names it: not an adapter's count, leave it
        # An upsert: a job ending now may create the base model's row in between.
        bind.execute(sa.text(
            "INSERT INTO job_outcome_counts (kind, model, status, shard, jobs) VALUES (:kind, :base, :status, :shard, "
            ":jobs) ON CONFLICT (kind, model, status, shard) DO UPDATE SET jobs = job_outcome_counts.jobs + "
            "excluded.jobs"), {"kind": kind, "base": base, "status": status, "shard": shard, "jobs": jobs})
        bind.execute(sa.text(
            "DELETE FROM job_outcome_counts WHERE kind = :kind AND model = :model AND status = :status "
            "AND shard = :shard"), {"kind": kind, "model": adapter_id, "status": status, "shard": shard})


def downgrade() -> None:
    pass  # the counts stay merged: 0007's table has no record of which adapter they came from
