"""Operator pages: each session's recipient count and whether the receiver blocked us (the
/ops charts aggregate them in the database), and an audit log of operators' actions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 10:00:00
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rcpts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('blocked', sa.Boolean(), nullable=False, server_default=sa.false()))
    # sessions recorded before: count their RCPT commands (whether they were blocked is unknown)
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, commands FROM sessions")).all()
    for sid, cmds in rows:
        if isinstance(cmds, str):
            cmds = json.loads(cmds)
        n = sum(1 for c in cmds or [] if c and c[0] == "RCPT")
        if n:
            bind.execute(sa.text("UPDATE sessions SET rcpts = :n WHERE id = :id"), {"n": n, "id": sid})
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=300), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index('ix_audit_log_at', ['at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_log_at')
    op.drop_table('audit_log')
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_column('blocked')
        batch_op.drop_column('rcpts')
