"""Chain heads: the newest record of every chain, and its decision counts, in one row.

Appending reads the head of a chain and a policy input reads an agent's decision
counts; both were queries over the whole chain. The head row makes them one
primary-key read whatever the length of the history, and it names the newest record,
so deleting the newest records of a chain is detected by ``verify``. Existing chains
get their head from their records.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

HEAD = "governance_chain_head"
EVENT = "governance_event"


def upgrade() -> None:
    op.create_table(
        HEAD,
        sa.Column("chain", sa.String(), primary_key=True),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(), nullable=False),
        sa.Column("decisions", sa.Integer(), nullable=False),
        sa.Column("refusals", sa.Integer(), nullable=False),
    )
    op.execute(
        f"""
        INSERT INTO {HEAD} (chain, seq, hash, decisions, refusals)
        SELECT e.chain, e.seq, e.hash, c.decisions, c.refusals
        FROM {EVENT} e JOIN (
            SELECT chain, MAX(seq) AS seq,
                   SUM(CASE WHEN kind = 'decision' THEN 1 ELSE 0 END) AS decisions,
                   SUM(CASE WHEN kind = 'decision' AND verdict = 'refused' THEN 1 ELSE 0 END)
                       AS refusals
            FROM {EVENT} GROUP BY chain
        ) c ON e.chain = c.chain AND e.seq = c.seq
        """
    )


def downgrade() -> None:
    op.drop_table(HEAD)
