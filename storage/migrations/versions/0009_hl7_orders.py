"""HL7 v2: imaging orders (ORM^O01 / OMI^O23) and the inbound message log (docs/hl7.md).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "imaging_order",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("placer_order_number", sa.String(64), nullable=False),
        sa.Column("placer_namespace", sa.String(64), nullable=False),
        sa.Column("filler_order_number", sa.String(64), nullable=True),
        sa.Column("accession_number", sa.String(64), nullable=True),
        sa.Column("order_control", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("patient_issuer", sa.String(64), nullable=False),
        sa.Column("patient_name", sa.String(324), nullable=True),
        sa.Column("birth_date", sa.String(8), nullable=True),
        sa.Column("sex", sa.String(16), nullable=True),
        sa.Column("procedure_code", sa.String(64), nullable=True),
        sa.Column("procedure_system", sa.String(64), nullable=True),
        sa.Column("procedure_text", sa.String(200), nullable=True),
        sa.Column("ordering_provider", sa.String(324), nullable=True),
        sa.Column("priority", sa.String(16), nullable=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("sending_application", sa.String(64), nullable=False),
        sa.Column("sending_facility", sa.String(64), nullable=False),
        sa.Column("message_type", sa.String(16), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("placer_namespace", "placer_order_number", name="uq_order_placer"),
    )
    op.create_index("ix_imaging_order_accession_number", "imaging_order", ["accession_number"])
    op.create_table(
        "hl7_inbound_message",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sending_application", sa.String(64), nullable=False),
        sa.Column("sending_facility", sa.String(64), nullable=False),
        sa.Column("control_id", sa.String(199), nullable=False),
        sa.Column("message_type", sa.String(16), nullable=False),
        sa.Column("ack_code", sa.String(2), nullable=False),
        sa.Column("ack", sa.Text, nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("sending_application", "sending_facility", "control_id", name="uq_hl7_inbound_control_id"),
    )


def downgrade() -> None:
    op.drop_table("hl7_inbound_message")
    op.drop_table("imaging_order")
