"""Source revisions: an instance replaced with other content is judged again.

``instance.revision`` counts the replacements of an instance's content under its SOP Instance
UID (``dicom.on_conflict = "replace"``; 0 as first stored). ``inference_result.source_revision``
names the revision a result judged, and the result's uniqueness becomes per (instance, model,
version, revision): the same model version judges a replaced image again, and the result of an
earlier revision stays as history (older study result versions cite it) without counting any more.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance") as batch:
        batch.add_column(sa.Column("revision", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("inference_result") as batch:
        batch.add_column(sa.Column("source_revision", sa.Integer, nullable=False, server_default="0"))
        batch.drop_constraint("uq_result_instance_model", type_="unique")
        batch.create_unique_constraint(
            "uq_result_instance_model_revision", ["instance_pk", "model_id", "model_version", "source_revision"]
        )


def downgrade() -> None:
    # Only the newest revision's result per (instance, model, version) can survive the old key.
    op.execute(
        "DELETE FROM inference_result WHERE source_revision < "
        "(SELECT revision FROM instance WHERE instance.id = inference_result.instance_pk)"
    )
    with op.batch_alter_table("inference_result") as batch:
        batch.drop_constraint("uq_result_instance_model_revision", type_="unique")
        batch.create_unique_constraint("uq_result_instance_model", ["instance_pk", "model_id", "model_version"])
        batch.drop_column("source_revision")
    if op.get_bind().dialect.name == "sqlite":
        # A batch "move and copy" of instance would drop a table that others reference; SQLite
        # (3.35+) drops an unindexed, unconstrained column in place.
        op.execute("ALTER TABLE instance DROP COLUMN revision")
    else:
        op.drop_column("instance", "revision")
