"""Indexes added to a table that may be large and in use: built without blocking its writes."""

from __future__ import annotations

from alembic import op
from sqlalchemy import text


def create_index_online(name: str, table: str, columns: list[str]) -> None:
    """Create an index; on PostgreSQL concurrently, so submits and workers write on meanwhile.

    A plain CREATE INDEX holds writes to the table for the whole build (seconds per million
    jobs). A concurrent one cannot run in a transaction, so it runs in its own, after the
    migration's; it is the migration's last step, and run again it finishes what a killed
    build left (PostgreSQL keeps such an index, marked invalid, and no query uses it).
    """
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(name, table, columns)
        return
    with op.get_context().autocommit_block():
        invalid = op.get_bind().execute(
            text("SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                 "WHERE c.relname = :name AND pg_table_is_visible(c.oid)"),
            {"name": name},
        ).scalar()
        if invalid:
            op.drop_index(name, table_name=table, postgresql_concurrently=True)
        op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True)
