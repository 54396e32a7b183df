"""Inference results.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inference_result",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("instance_pk", sa.Integer, sa.ForeignKey("instance.id"), nullable=False, index=True),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("probability", sa.Float),
        sa.Column("label", sa.String(32)),
        sa.Column("threshold", sa.Float),
        sa.Column("timings_ms", sa.JSON, nullable=False),
        sa.Column("sr_instance_pk", sa.Integer, sa.ForeignKey("instance.id")),
        sa.Column("sc_instance_pk", sa.Integer, sa.ForeignKey("instance.id")),
        sa.Column("created_at", UTCDateTime(), nullable=False, index=True),
        sa.UniqueConstraint("instance_pk", "model_id", "model_version", name="uq_result_instance_model"),
    )


def downgrade() -> None:
    op.drop_table("inference_result")
