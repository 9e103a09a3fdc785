"""Opt-out entries carry a state (active | pending), how they were proved, a DNS proof token
and the requester's contact: shared providers' entries wait for proof or an operator.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 09:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('exemptions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('state', sa.String(length=16), nullable=False, server_default='active'))
        batch_op.add_column(sa.Column('proof', sa.String(length=200), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('token', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('contact', sa.String(length=300), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('why', sa.Text(), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('proved_at', sa.Float(), nullable=True))
        batch_op.create_index('ix_exemptions_state', ['state'], unique=False)
    op.execute("UPDATE exemptions SET proof = 'entered before proofs were recorded (' || source || ')'")


def downgrade() -> None:
    with op.batch_alter_table('exemptions', schema=None) as batch_op:
        batch_op.drop_index('ix_exemptions_state')
        for col in ('proved_at', 'why', 'contact', 'token', 'proof', 'state'):
            batch_op.drop_column(col)
