"""The lineage schema as the release before migrations created it (SQLModel create_all).

Both tables exactly as ``create_all`` made them on SQLite and PostgreSQL, so a
database from that release is stamped at this revision and upgraded in place.
That release created each table on first use, so a table it left out is
created here and one it made is kept.

Revision ID: 0001
Revises:
Create Date: 2025-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

EVENT = "governance_event"
MEMORY = "governance_agent_memory"
_TIMESTAMP = sa.DateTime(timezone=True)  # DATETIME on SQLite, TIMESTAMPTZ on PostgreSQL


def _event_table() -> None:
    op.create_table(
        EVENT,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("event_id", sa.String(), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("agent_id", sa.String(), nullable=True),
        sa.Column("flow_run_id", sa.String(), nullable=True),
        sa.Column("envelope_id", sa.String(), nullable=True),
        sa.Column("decision_id", sa.String(), nullable=True),
        sa.Column("verdict", sa.String(), nullable=True),
        sa.Column("allow", sa.Boolean(), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("engine", sa.String(), nullable=True),
        sa.Column("policy_path", sa.String(), nullable=True),
        sa.Column("policy_revision", sa.String(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("mode", sa.String(), nullable=True),
        sa.Column("state", sa.String(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("chain", sa.String(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("prev_hash", sa.String(), nullable=True),
        sa.Column("hash", sa.String(), nullable=False),
        sa.UniqueConstraint("chain", "seq", name="uq_governance_event_chain_seq"),
    )
    for column in ("agent_id", "created_at", "decision_id", "flow_run_id", "kind"):
        op.create_index(f"ix_{EVENT}_{column}", EVENT, [column])
    op.create_index(f"ix_{EVENT}_event_id", EVENT, ["event_id"], unique=True)


def _memory_table() -> None:
    op.create_table(
        MEMORY,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content", sa.JSON(), nullable=False),
        sa.Column("content_hash", sa.String(), nullable=False),
        sa.Column("schema_hash", sa.String(), nullable=False),
        sa.Column("decision_id", sa.String(), nullable=True),
        sa.Column("flow_run_id", sa.String(), nullable=True),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        # Unnamed, as create_all left it (PostgreSQL: governance_agent_memory_agent_id_version_key).
        sa.UniqueConstraint("agent_id", "version"),
    )
    op.create_index(f"ix_{MEMORY}_agent_id", MEMORY, ["agent_id"])


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if EVENT not in existing:
        _event_table()
    if MEMORY not in existing:
        _memory_table()


def downgrade() -> None:
    op.drop_table(MEMORY)
    op.drop_table(EVENT)
