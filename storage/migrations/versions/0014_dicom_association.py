"""Accepted DICOM associations, one row each, written once when the association has ended.

``dicom_association`` (storage/associations.py): calling and called AE titles, the peer's address,
how it ended (``ended_by``: ``released``, ``aborted``, ``closed``), when it started and ended, the
instances it stored and had refused, TLS or not, and the acceptor process (host and pid) that
served it. No patient data. Every acceptor process writes its own rows, so ``/metrics`` of the
``serve`` process counts the associations of the whole deployment
(``pneumo_dicom_associations_total``, ``pneumo_dicom_association_seconds``; storage/metrics.py).
Rejected associations are not written: they are audited as (throttled) Security Alerts. Starts
empty: associations before the upgrade were never recorded.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_association",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("called_ae", sa.String(16), nullable=False),
        sa.Column("peer_address", sa.String(64)),
        sa.Column("ended_by", sa.String(16), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("ended_at", UTCDateTime(), nullable=False),
        sa.Column("instances_stored", sa.Integer, nullable=False),
        sa.Column("instances_refused", sa.Integer, nullable=False),
        sa.Column("tls", sa.Boolean, nullable=False),
        sa.Column("acceptor_host", sa.String(255), nullable=False),
        sa.Column("acceptor_pid", sa.Integer, nullable=False),
    )
    op.create_index("ix_dicom_association_ended_at", "dicom_association", ["ended_at"])


def downgrade() -> None:
    op.drop_index("ix_dicom_association_ended_at", table_name="dicom_association")
    op.drop_table("dicom_association")
