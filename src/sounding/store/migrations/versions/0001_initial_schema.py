"""Initial schema: clients, usage, jobs and their rows, caches, exemptions, sessions, kv

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-23 08:33:55.558052
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('clients',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('key_prefix', sa.String(length=16), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('operator', sa.Boolean(), nullable=False),
    sa.Column('daily_quota', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_clients_key_prefix'), ['key_prefix'], unique=False)

    op.create_table('domain_cache',
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('mx_host', sa.String(length=255), nullable=True),
    sa.Column('catch_all', sa.Boolean(), nullable=True),
    sa.Column('checked_at', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('domain')
    )
    op.create_table('exemptions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('value', sa.String(length=300), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('added', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('exemptions', schema=None) as batch_op:
        batch_op.create_index('uq_exemptions_kind_value', ['kind', 'value'], unique=True)

    op.create_table('kv',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.JSON(), nullable=False),
    sa.Column('updated', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('sessions',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('started', sa.Float(), nullable=False),
    sa.Column('ended', sa.Float(), nullable=False),
    sa.Column('mx_host', sa.String(length=255), nullable=False),
    sa.Column('mx_ip', sa.String(length=64), nullable=False),
    sa.Column('source_ip', sa.String(length=128), nullable=False),
    sa.Column('domains', sa.Text(), nullable=False),
    sa.Column('job_ids', sa.Text(), nullable=False),
    sa.Column('commands', sa.JSON(), nullable=False),
    sa.Column('outcome', sa.String(length=200), nullable=False),
    sa.Column('transcript', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sessions_mx_host'), ['mx_host'], unique=False)
        batch_op.create_index(batch_op.f('ix_sessions_mx_ip'), ['mx_ip'], unique=False)
        batch_op.create_index(batch_op.f('ix_sessions_started'), ['started'], unique=False)

    op.create_table('verdict_cache',
    sa.Column('key', sa.String(length=1000), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('checked_at', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    with op.batch_alter_table('verdict_cache', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_verdict_cache_expires_at'), ['expires_at'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('client_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('filename', sa.String(length=300), nullable=False),
    sa.Column('fmt', sa.String(length=8), nullable=False),
    sa.Column('header', sa.JSON(), nullable=True),
    sa.Column('email_column', sa.String(length=200), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('unique_addresses', sa.Integer(), nullable=False),
    sa.Column('done', sa.Integer(), nullable=False),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('finished_at', sa.Float(), nullable=True),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_until', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['client_id'], ['clients.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_client_id'), ['client_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_state'), ['state'], unique=False)

    op.create_table('usage',
    sa.Column('client_id', sa.Integer(), nullable=False),
    sa.Column('day', sa.String(length=10), nullable=False),
    sa.Column('addresses', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['client_id'], ['clients.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('client_id', 'day')
    )
    op.create_table('job_rows',
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('line', sa.Integer(), nullable=False),
    sa.Column('cells', sa.JSON(), nullable=False),
    sa.Column('address', sa.String(length=1000), nullable=False),
    sa.Column('key', sa.String(length=1000), nullable=False),
    sa.Column('read_error', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=True),
    sa.Column('reason', sa.String(length=32), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('done_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'idx')
    )
    with op.batch_alter_table('job_rows', schema=None) as batch_op:
        batch_op.create_index('ix_job_rows_key', ['job_id', 'key'], unique=False)
        batch_op.create_index('ix_job_rows_pending', ['job_id', 'done_at', 'key'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('job_rows', schema=None) as batch_op:
        batch_op.drop_index('ix_job_rows_pending')
        batch_op.drop_index('ix_job_rows_key')

    op.drop_table('job_rows')
    op.drop_table('usage')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_state'))
        batch_op.drop_index(batch_op.f('ix_jobs_client_id'))

    op.drop_table('jobs')
    with op.batch_alter_table('verdict_cache', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_verdict_cache_expires_at'))

    op.drop_table('verdict_cache')
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sessions_started'))
        batch_op.drop_index(batch_op.f('ix_sessions_mx_ip'))
        batch_op.drop_index(batch_op.f('ix_sessions_mx_host'))

    op.drop_table('sessions')
    op.drop_table('kv')
    with op.batch_alter_table('exemptions', schema=None) as batch_op:
        batch_op.drop_index('uq_exemptions_kind_value')

    op.drop_table('exemptions')
    op.drop_table('domain_cache')
    with op.batch_alter_table('clients', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_clients_key_prefix'))

    op.drop_table('clients')
