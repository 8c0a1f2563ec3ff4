"""Run and inspect Alembic migrations, the only source of the schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(database_url: str | None = None) -> Config:
    """Build the Alembic config in code, so it works from any working directory."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if database_url:
        config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the database to a revision (head by default)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Downgrade the database to a revision."""
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    """Return the single head revision of the migrations."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have exactly one head, found {heads}")
    return heads[0]


def upgrade_known(database_url: str) -> str:
    """Upgrade the database to head and return it; raise SchemaOutOfDate, saying what to do,
    if the database is at a revision these migrations do not know (Alembic's own error was a
    traceback): a newer release's, or not one of ours."""
    from shared.db import Database, SchemaOutOfDate, schema_is_newer, schema_mismatch

    head = head_revision()
    db = Database(database_url)
    try:
        current = db.schema_revision()
    finally:
        db.dispose()
    if schema_is_newer(current, head):
        raise SchemaOutOfDate(schema_mismatch(current, head))
    if current is not None and not _known(current):
        raise SchemaOutOfDate(f"database schema is at revision {current!r}, which no gemma-jobs migration made: "
                              "is DATABASE_URL another application's database?")
    upgrade(database_url)
    return head


def _known(revision: str) -> bool:
    """Return whether the migrations hold a revision."""
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False
