"""Parameter schemas: the first parameter schema the worker saw for each deployment.

Redaction compares a deployment's parameter schema with this reference, so an API
client that edits the schema (removes ``format: password``) does not unredact a secret.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLE = "governance_parameter_schema"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("deployment_id", sa.String(), primary_key=True),
        sa.Column("parameter_schema", sa.JSON(), nullable=False),
        sa.Column("schema_hash", sa.String(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table(TABLE)
