"""The store identity: which file store this database indexes.

``store_identity`` holds exactly one row (``id`` = 1) with a random ``store_id``; the same id is
written to a marker file at the root of the file store (:mod:`storage.integrity`). At start-up
the two must agree: a database that was deleted, emptied or swapped for another one no longer
holds the store's id, and the gateway refuses to serve on it instead of silently starting on an
empty index while the store still holds every instance it acknowledged.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "store_identity",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("store_id", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("id = 1", name="ck_store_identity_single_row"),
    )


def downgrade() -> None:
    op.drop_table("store_identity")
