"""Domain findings: the probes' replies beside the catch-all flag (a fleet's next owner of a
receiver starts from them instead of asking postmaster@ and a random address again)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('domain_cache', schema=None) as batch_op:
        batch_op.add_column(sa.Column('findings', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('domain_cache', schema=None) as batch_op:
        batch_op.drop_column('findings')
