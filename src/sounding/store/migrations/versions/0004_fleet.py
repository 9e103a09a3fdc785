"""Fleet: receiver leases with fencing tokens, the work table, courtesy rows

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 09:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('receivers',
    sa.Column('receiver', sa.String(length=300), nullable=False),
    sa.Column('token', sa.BigInteger(), nullable=False),
    sa.Column('owner', sa.String(length=64), nullable=True),
    sa.Column('lease_until', sa.Float(), nullable=True),
    sa.Column('limiter', sa.JSON(), nullable=True),
    sa.Column('paused_until', sa.Float(), nullable=True),
    sa.Column('paused_why', sa.Text(), nullable=False),
    sa.Column('declined', sa.JSON(), nullable=True),
    sa.Column('updated', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('receiver')
    )
    op.create_table('work',
    sa.Column('key', sa.String(length=1000), nullable=False),
    sa.Column('receiver', sa.String(length=300), nullable=False),
    sa.Column('fresh', sa.Boolean(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('inflight_token', sa.BigInteger(), nullable=True),
    sa.Column('inflight_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('key')
    )
    with op.batch_alter_table('work', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_work_receiver'), ['receiver'], unique=False)
    op.create_table('courtesy_pairs',
    sa.Column('source', sa.String(length=300), nullable=False),
    sa.Column('receiver', sa.String(length=300), nullable=False),
    sa.Column('rep', sa.String(length=16), nullable=False),
    sa.Column('until', sa.Float(), nullable=False),
    sa.Column('blocks', sa.JSON(), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('last_used', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('source', 'receiver')
    )
    # a verdict is written into every job's rows with that address
    with op.batch_alter_table('job_rows', schema=None) as batch_op:
        batch_op.create_index('ix_job_rows_key_only', ['key'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job_rows', schema=None) as batch_op:
        batch_op.drop_index('ix_job_rows_key_only')
    op.drop_table('courtesy_pairs')
    with op.batch_alter_table('work', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_work_receiver'))
    op.drop_table('work')
    op.drop_table('receivers')
