"""Lineage records carry the worker's signature (lineage_auth): a nullable column, so
records written before it are kept, and count as not vouched for."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

EVENT = "governance_event"


def upgrade() -> None:
    with op.batch_alter_table(EVENT) as batch:
        batch.add_column(sa.Column("signature", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(EVENT) as batch:
        batch.drop_column("signature")
