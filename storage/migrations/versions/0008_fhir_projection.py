"""The FHIR projection: served resources, their versions and their search index (docs/fhir.md).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_UTC = UTCDateTime()


def upgrade() -> None:
    op.create_table(
        "fhir_resource",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("resource_type", sa.String(40), nullable=False),
        sa.Column("logical_id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("last_updated", _UTC, nullable=False),
        sa.Column("sort_date", _UTC, nullable=True),
        sa.Column("sort_date_high", _UTC, nullable=True),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.UniqueConstraint("resource_type", "logical_id", name="uq_fhir_resource_type_id"),
    )
    op.create_index("ix_fhir_resource_type_updated", "fhir_resource", ["resource_type", "last_updated", "id"])
    op.create_index("ix_fhir_resource_type_date", "fhir_resource", ["resource_type", "sort_date", "id"])
    op.create_index("ix_fhir_resource_type_date_high", "fhir_resource", ["resource_type", "sort_date_high", "id"])
    op.create_index("ix_fhir_resource_study_uid", "fhir_resource", ["study_uid"])
    op.create_table(
        "fhir_resource_version",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("resource_pk", sa.Integer, sa.ForeignKey("fhir_resource.id"), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("last_updated", _UTC, nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.UniqueConstraint("resource_pk", "version_id", name="uq_fhir_resource_version"),
    )
    op.create_table(
        "fhir_search_index",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("resource_pk", sa.Integer, sa.ForeignKey("fhir_resource.id"), nullable=False),
        sa.Column("resource_type", sa.String(40), nullable=False),
        sa.Column("param", sa.String(40), nullable=False),
        sa.Column("system", sa.String(200), nullable=True),
        sa.Column("value", sa.String(200), nullable=True),
        sa.Column("low", _UTC, nullable=True),
        sa.Column("high", _UTC, nullable=True),
    )
    op.create_index("ix_fhir_search_index_resource_pk", "fhir_search_index", ["resource_pk"])
    op.create_index("ix_fhir_search_value", "fhir_search_index", ["resource_type", "param", "value", "system", "resource_pk"])
    op.create_index("ix_fhir_search_date", "fhir_search_index", ["resource_type", "param", "low", "high", "resource_pk"])


def downgrade() -> None:
    op.drop_table("fhir_search_index")
    op.drop_table("fhir_resource_version")
    op.drop_table("fhir_resource")
