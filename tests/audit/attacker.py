"""What an attacker with the table owner's (or a superuser's) rights does first: drop the
append-only triggers of migration 0011 and take the revoked privileges back.

The tamper tests use this to reach the detection layer (hash chain, HMAC key, anchors) behind the
refusal layer; ``tests/storage/test_audit_append_only.py`` proves the refusal itself.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, text

DROP_GUARDS: dict[str, tuple[str, ...]] = {
    "sqlite": (
        "DROP TRIGGER IF EXISTS audit_record_no_update",
        "DROP TRIGGER IF EXISTS audit_record_no_delete",
        "DROP TRIGGER IF EXISTS audit_chain_head_forward_only",
        "DROP TRIGGER IF EXISTS audit_chain_head_no_delete",
    ),
    "postgresql": (
        "DROP TRIGGER IF EXISTS audit_record_append_only ON audit_record",
        "DROP TRIGGER IF EXISTS audit_chain_head_forward_only ON audit_chain_head",
        "DROP TRIGGER IF EXISTS audit_chain_head_no_delete ON audit_chain_head",
        "GRANT UPDATE, DELETE, TRUNCATE ON audit_record, audit_chain_head TO CURRENT_USER",
    ),
}


def drop_guards(execute: Callable[[str], object], dialect: str) -> None:
    """Run the owner's "lift the guard" statements through *execute* (any DB-API or SQLAlchemy call)."""
    for statement in DROP_GUARDS[dialect]:
        execute(statement)


def drop_guards_on(engine: Engine) -> None:
    """:func:`drop_guards` on *engine*, committed."""
    with engine.begin() as connection:
        drop_guards(lambda sql: connection.execute(text(sql)), engine.dialect.name)
