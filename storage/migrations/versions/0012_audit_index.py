"""The derived search index of the audit log (audit/search_index.py), for FHIR AuditEvent search.

One row per (parameter, value, record): ``type``/``subtype`` codes, ``agent`` user ids, ``entity``
object ids and ``patient`` Patient IDs. It is filled from the records by
``audit.search_index.catch_up`` (not by the append path), so it starts empty and the first search
after the upgrade indexes the existing log. Not part of the hash chain: dropping or editing it
changes what a search finds, never what ``pneumo audit verify`` proves.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_search_index",
        sa.Column("param", sa.String(16), primary_key=True),
        sa.Column("value", sa.String(255), primary_key=True),
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    )
    op.create_index("ix_audit_search_index_seq", "audit_search_index", ["seq"])


def downgrade() -> None:
    op.drop_index("ix_audit_search_index_seq", table_name="audit_search_index")
    op.drop_table("audit_search_index")
