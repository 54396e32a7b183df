"""Initial schema: patient/study/series/instance index, job queue, audit chain.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _timestamps() -> list[sa.Column[Any]]:
    return [
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "patient",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("name", sa.String(324)),
        sa.Column("birth_date", sa.String(8)),
        sa.Column("sex", sa.String(16)),
        *_timestamps(),
        sa.UniqueConstraint("patient_id", "issuer", name="uq_patient_id_issuer"),
    )
    op.create_table(
        "study",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("patient_pk", sa.Integer, sa.ForeignKey("patient.id"), nullable=False, index=True),
        sa.Column("study_date", sa.String(8)),
        sa.Column("study_time", sa.String(16)),
        sa.Column("accession_number", sa.String(16), index=True),
        sa.Column("study_id", sa.String(16)),
        sa.Column("description", sa.String(64)),
        sa.Column("referring_physician", sa.String(324)),
        *_timestamps(),
    )
    op.create_table(
        "series",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_pk", sa.Integer, sa.ForeignKey("study.id"), nullable=False, index=True),
        sa.Column("modality", sa.String(16)),
        sa.Column("series_number", sa.Integer),
        sa.Column("body_part_examined", sa.String(16)),
        sa.Column("description", sa.String(64)),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "instance",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=False, index=True),
        sa.Column("series_pk", sa.Integer, sa.ForeignKey("series.id"), nullable=False, index=True),
        sa.Column("instance_number", sa.Integer),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(300), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("received_at", UTCDateTime(), nullable=False, index=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "job",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("dedup_key", sa.String(200), nullable=False, unique=True),
        sa.Column("instance_pk", sa.Integer, sa.ForeignKey("instance.id"), index=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("run_after", UTCDateTime(), nullable=False),
        sa.Column("lease_expires_at", UTCDateTime()),
        sa.Column("locked_by", sa.String(100)),
        sa.Column("last_error", sa.Text),
        *_timestamps(),
    )
    op.create_index("ix_job_claim", "job", ["state", "run_after"])
    op.create_table(
        "audit_record",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False, index=True),
        sa.Column("event_id", sa.String(16), nullable=False, index=True),
        sa.Column("outcome", sa.Integer, nullable=False),
        sa.Column("event", sa.JSON, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
    )
    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "last_seq": 0, "last_hash": "0" * 64}])


def downgrade() -> None:
    for table in ("audit_chain_head", "audit_record", "job", "instance", "series", "study", "patient"):
        op.drop_table(table)
