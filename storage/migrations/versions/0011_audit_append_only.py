"""The audit log becomes append-only in the database itself.

HIPAA §164.312(b) and DICOM PS3.15 Annex A.5 ask for an audit trail that cannot be altered; the
hash chain, the HMAC key and the anchor checkpoints (``audit.store``, ``audit.anchor``) *detect*
an alteration. This migration makes the database *refuse* one from an ordinary connection:

* ``audit_record``: every UPDATE, DELETE (and on PostgreSQL TRUNCATE) is rejected by a trigger,
  whatever role issues it, superusers included, as long as the trigger exists;
* ``audit_chain_head`` (moved on every append, by design): an update may not lower ``last_seq``
  nor change ``last_hash`` without advancing ``last_seq`` (which is how an attacker hides a
  removed tail), nor change ``id``; the row may not be deleted (or truncated);
* PostgreSQL only: UPDATE, DELETE and TRUNCATE on ``audit_record`` (and DELETE, TRUNCATE on the
  head) are revoked from PUBLIC and from the role running the migration, a second, independent
  refusal ("permission denied") for a non-superuser.

What this does *not* stop: the table owner or a superuser can drop the triggers and grant
themselves the privileges back, and anyone with the SQLite file can edit it with another
program. That is why the records are also HMAC-sealed and anchored outside the database; and why
the gateway should run as a role that neither owns the tables nor is a superuser (the SQL is in
docs/security.md and docs/audit.md).

SQLite caveat for later migrations: a ``batch_alter_table`` on ``audit_record`` or
``audit_chain_head`` recreates the table ("move and copy"), and SQLite drops a table's triggers
with it. Such a migration must create the triggers again (``tests/storage/test_audit_append_only``
fails at head when they are missing).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_REFUSED = "pneumo: audit_record is append-only"
_HEAD_REFUSED = "pneumo: the audit chain head may only move forward"

_SQLITE_UP = [
    f"""CREATE TRIGGER audit_record_no_update BEFORE UPDATE ON audit_record
        BEGIN SELECT RAISE(ABORT, '{_REFUSED}: UPDATE refused'); END""",
    # SQLite has no TRUNCATE: "DELETE FROM audit_record" without WHERE runs this trigger too (the
    # truncate optimisation is disabled for tables with triggers).
    f"""CREATE TRIGGER audit_record_no_delete BEFORE DELETE ON audit_record
        BEGIN SELECT RAISE(ABORT, '{_REFUSED}: DELETE refused'); END""",
    f"""CREATE TRIGGER audit_chain_head_forward_only BEFORE UPDATE ON audit_chain_head
        WHEN NEW.id <> OLD.id OR NEW.last_seq < OLD.last_seq
             OR (NEW.last_seq = OLD.last_seq AND NEW.last_hash <> OLD.last_hash)
        BEGIN SELECT RAISE(ABORT, '{_HEAD_REFUSED}'); END""",
    f"""CREATE TRIGGER audit_chain_head_no_delete BEFORE DELETE ON audit_chain_head
        BEGIN SELECT RAISE(ABORT, '{_HEAD_REFUSED}: DELETE refused'); END""",
]
_SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS audit_chain_head_no_delete",
    "DROP TRIGGER IF EXISTS audit_chain_head_forward_only",
    "DROP TRIGGER IF EXISTS audit_record_no_delete",
    "DROP TRIGGER IF EXISTS audit_record_no_update",
]

# Statement-level triggers: TRUNCATE has no rows to fire for, and an UPDATE or DELETE that would
# touch no row is refused as well (probing is refused like doing). SQLSTATE 42501
# (insufficient_privilege) is what the REVOKE below gives a non-superuser, so callers see one code.
_PG_UP = [
    f"""CREATE FUNCTION pneumo_audit_record_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '{_REFUSED}: % refused', TG_OP USING ERRCODE = '42501';
        END $$""",
    """CREATE TRIGGER audit_record_append_only
        BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_record
        FOR EACH STATEMENT EXECUTE FUNCTION pneumo_audit_record_append_only()""",
    f"""CREATE FUNCTION pneumo_audit_chain_head_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'UPDATE' THEN
                RAISE EXCEPTION '{_HEAD_REFUSED}: % refused', TG_OP USING ERRCODE = '42501';
            END IF;
            IF NEW.id <> OLD.id OR NEW.last_seq < OLD.last_seq
               OR (NEW.last_seq = OLD.last_seq AND NEW.last_hash <> OLD.last_hash) THEN
                RAISE EXCEPTION '{_HEAD_REFUSED} (last_seq % to %)', OLD.last_seq, NEW.last_seq
                    USING ERRCODE = '42501';
            END IF;
            RETURN NEW;
        END $$""",
    """CREATE TRIGGER audit_chain_head_forward_only
        BEFORE UPDATE ON audit_chain_head
        FOR EACH ROW EXECUTE FUNCTION pneumo_audit_chain_head_forward_only()""",
    """CREATE TRIGGER audit_chain_head_no_delete
        BEFORE DELETE OR TRUNCATE ON audit_chain_head
        FOR EACH STATEMENT EXECUTE FUNCTION pneumo_audit_chain_head_forward_only()""",
    "REVOKE UPDATE, DELETE, TRUNCATE ON audit_record FROM PUBLIC, CURRENT_USER",
    "REVOKE DELETE, TRUNCATE ON audit_chain_head FROM PUBLIC, CURRENT_USER",
]
_PG_DOWN = [
    "GRANT UPDATE, DELETE, TRUNCATE ON audit_record TO CURRENT_USER",
    "GRANT DELETE, TRUNCATE ON audit_chain_head TO CURRENT_USER",
    "DROP TRIGGER IF EXISTS audit_chain_head_no_delete ON audit_chain_head",
    "DROP TRIGGER IF EXISTS audit_chain_head_forward_only ON audit_chain_head",
    "DROP TRIGGER IF EXISTS audit_record_append_only ON audit_record",
    "DROP FUNCTION IF EXISTS pneumo_audit_chain_head_forward_only()",
    "DROP FUNCTION IF EXISTS pneumo_audit_record_append_only()",
]


def _statements(up: bool) -> list[str]:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        return _SQLITE_UP if up else _SQLITE_DOWN
    if dialect == "postgresql":
        return _PG_UP if up else _PG_DOWN
    return []  # no other dialect is supported; nothing to install


def upgrade() -> None:
    for statement in _statements(up=True):
        op.execute(statement)


def downgrade() -> None:
    for statement in _statements(up=False):
        op.execute(statement)
