"""Audit hash versions: records hash every column, optionally with an HMAC key.

``audit_record.hash_version`` says how a record's ``hash`` was computed (``audit.store``):
1 legacy, 2 SHA-256 over every column, 3 HMAC-SHA256 over every column. Existing records become
version 1 and are verified exactly as they were written; they are *not* re-hashed. Re-hashing at
migration time would bless whatever the table holds at that moment, tampered or not, and erase
the evidence an old chain still carries. Version 1 already covers ``seq``, ``prev_hash``,
``recorded_at`` and the event JSON; its ``event_id`` and ``outcome`` columns are copies of fields
of that JSON, which verification compares, so an edit of either column is detected there too.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_record") as batch:
        batch.add_column(sa.Column("hash_version", sa.Integer, nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("audit_record") as batch:
        batch.drop_column("hash_version")
