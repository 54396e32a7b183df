"""Migration 0011: the application's own connection cannot rewrite the audit log (SQLite and
PostgreSQL), the chain head only moves forward, the documented non-owner role is refused by its
privileges even without the triggers, and the migration goes down and up again."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from audit.builders import application_activity
from audit.events import AuditSource
from audit.store import append, verify_chain
from storage.db import Database
from storage.migrate import upgrade
from tests.audit.attacker import drop_guards_on
from tests.conftest import POSTGRES_URL
from tests.storage.test_migrations import _downgrade_to

SOURCE = AuditSource("PNEUMO@test")


def _write(database: Database, n: int) -> None:
    with database.session() as session:
        for i in range(n):
            append(session, application_activity(SOURCE, started=i % 2 == 0, process_name="t", host="h",
                                                  when=dt.datetime.now(dt.UTC)))


def _refused(database: Database, sql: str) -> str:
    """Run *sql* on the application's connection; it must fail. Returns the database's message."""
    with pytest.raises(DBAPIError) as raised, database.engine.begin() as connection:
        connection.execute(text(sql))
    return str(raised.value.orig)


REWRITES = [
    "UPDATE audit_record SET outcome = 8 WHERE seq = 2",
    "UPDATE audit_record SET event_id = event_id",
    "DELETE FROM audit_record WHERE seq = 3",
    "DELETE FROM audit_record",
]
HEAD_REWRITES = [
    "UPDATE audit_chain_head SET last_seq = 1",  # rewind: hides a removed tail
    "UPDATE audit_chain_head SET last_hash = '" + "0" * 64 + "'",  # same seq, other hash
    "UPDATE audit_chain_head SET id = 2",
    "DELETE FROM audit_chain_head",
]


def test_the_application_connection_cannot_rewrite_the_audit_log(database: Database) -> None:
    _write(database, 3)
    for sql in REWRITES:
        assert "append-only" in _refused(database, sql), sql
    if database.engine.dialect.name == "postgresql":
        assert "TRUNCATE refused" in _refused(database, "TRUNCATE audit_record")
        assert "forward" in _refused(database, "TRUNCATE audit_chain_head")
    for sql in HEAD_REWRITES:
        assert "forward" in _refused(database, sql), sql
    # Nothing changed, and the ordinary path (insert records, move the head forward) still works;
    # so does the no-op head update the HL7 tests use to hold the head's lock.
    with database.engine.begin() as connection:
        connection.execute(text("UPDATE audit_chain_head SET last_seq = last_seq WHERE id = 1"))
    _write(database, 2)
    with database.read_session() as session:
        result = verify_chain(session)
    assert result.ok and result.records == 5


def test_0011_goes_down_and_up_again(database_url: str) -> None:
    database = Database(database_url)
    try:
        upgrade(database)
        _write(database, 2)
        _downgrade_to(database, "0010")
        with database.engine.begin() as connection:  # no guard below 0011
            connection.execute(text("UPDATE audit_record SET outcome = outcome WHERE seq = 1"))
            connection.execute(text("UPDATE audit_chain_head SET last_seq = last_seq - 1, last_hash = 'x'"))
            connection.execute(text("UPDATE audit_chain_head SET last_seq = last_seq + 1, last_hash = "
                                    "(SELECT hash FROM audit_record WHERE seq = 2)"))
        upgrade(database)
        assert "append-only" in _refused(database, "DELETE FROM audit_record WHERE seq = 1")
        _write(database, 1)
        with database.read_session() as session:
            assert verify_chain(session).records == 3
    finally:
        database.dispose()


@pytest.mark.postgres
def test_a_non_owner_role_with_the_documented_grants_is_refused_by_privilege(postgres_url: str) -> None:
    """The role advice of docs/security.md: the gateway runs as a role that neither owns the tables
    nor is a superuser. It starts (the schema is current), writes audit records, and is refused a
    rewrite by its privileges even after the owner dropped the triggers; it cannot drop them."""
    owner = Database(postgres_url)
    upgrade(owner)
    schema = postgres_url.rsplit("%3D", 1)[1]
    role = f"pneumo_app_{uuid.uuid4().hex[:8]}"
    grants = [
        f'CREATE ROLE "{role}" LOGIN',
        f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"',
        f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"',
        f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA "{schema}" TO "{role}"',
        f'REVOKE UPDATE, DELETE, TRUNCATE ON audit_record FROM "{role}"',
        f'REVOKE DELETE, TRUNCATE ON audit_chain_head FROM "{role}"',
        f'REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM "{role}"',
    ]
    with owner.engine.begin() as connection:
        for sql in grants:
            connection.execute(text(sql))
    app_url = postgres_url.replace("postgres@", f"{role}@", 1)
    assert app_url != postgres_url and POSTGRES_URL.startswith("postgresql+psycopg://postgres@")
    app = Database(app_url)
    try:
        upgrade(app)  # at head: the start-up migration check passes without DDL rights
        _write(app, 3)
        drop_guards_on(owner.engine)  # only the privileges are left between the app and the rows
        for sql in (*REWRITES, "TRUNCATE audit_record", "DELETE FROM audit_chain_head"):
            assert "permission denied" in _refused(app, sql), sql
        assert "must be owner" in _refused(app, "DROP TABLE audit_record")
        with app.read_session() as session:
            assert verify_chain(session).records == 3
    finally:
        app.dispose()
        with owner.engine.begin() as connection:
            connection.execute(text(f'DROP OWNED BY "{role}"'))
            connection.execute(text(f'DROP ROLE "{role}"'))
        owner.dispose()
