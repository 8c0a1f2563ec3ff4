"""Per-key rate-limit windows, and token reservations on jobs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rate_limit_windows',
    sa.Column('key_id', sa.String(length=40), nullable=False),
    sa.Column('window_start', sa.DateTime(), nullable=False),
    sa.Column('requests', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], name=op.f('fk_rate_limit_windows_key_id_api_keys')),
    sa.PrimaryKeyConstraint('key_id', 'window_start', name=op.f('pk_rate_limit_windows'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reserved_tokens', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('rate_window_start', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('rate_window_start')
        batch_op.drop_column('reserved_tokens')

    op.drop_table('rate_limit_windows')
