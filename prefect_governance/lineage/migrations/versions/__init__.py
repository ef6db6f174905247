"""The lineage schema's revisions (Alembic skips this file)."""
