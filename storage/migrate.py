"""Apply the Alembic migrations programmatically (on start, and from tests).

Several processes may start at once against one database (``pneumo serve`` and ``pneumo worker``
pods, each migrating at start). They must not run the migrations side by side: two would both
find revision N and both create revision N+1's tables. :func:`upgrade` therefore serialises them:

* PostgreSQL: the migration's transaction first takes the transaction-level advisory lock
  :data:`MIGRATION_LOCK_KEY` (``pg_advisory_xact_lock``), in READ COMMITTED, so a second process
  waits for the first to commit and then reads the revision it left: the schema is current and
  it does nothing. The lock is released with the transaction (also when the process dies). The
  key is fixed and per database (advisory locks are not per schema).
* SQLite: nothing more is needed. The migration runs in one ``BEGIN IMMEDIATE`` transaction
  (:mod:`storage.db`; DDL is transactional there), which takes the database's one write lock
  before Alembic reads the revision; a second process waits for it (the busy timeout, 60 s)
  and then sees the committed revision.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from storage.db import Database

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

#: The PostgreSQL advisory lock (``pg_advisory_xact_lock``) every migration takes: the ASCII bytes
#: of "pneumoMG" as a (positive) bigint. Fixed, so that every version of the gateway takes the same one.
MIGRATION_LOCK_KEY = 0x706E65756D6F4D47


def _config(database: Database) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade(database: Database) -> None:
    """Bring the schema to the newest revision. Safe to call on every start."""
    config = _config(database)
    with database.engine.connect() as connection:
        if not database.is_sqlite:
            # Each statement sees what committed before it: after the wait below, the revision
            # another process just migrated to (not a snapshot taken before the wait).
            connection.execution_options(isolation_level="READ COMMITTED")
        with connection.begin():
            if not database.is_sqlite:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")


def head_revision(database: Database) -> str | None:
    """The newest revision this version's migrations know."""
    return ScriptDirectory.from_config(_config(database)).get_current_head()


def current_revision(database: Database) -> str | None:
    """The revision the database is at (None: no schema yet)."""
    with database.read_engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def is_current(database: Database) -> bool:
    """True when the database is at the newest revision (used by ``/ready``)."""
    return current_revision(database) == head_revision(database)
