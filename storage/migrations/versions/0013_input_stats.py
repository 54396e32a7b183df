"""Input statistics of each analysed image, for model drift monitoring.

``inference_result.input_stats``: a few PHI-free numbers about the model input (mean and standard
deviation of the [0, 1] intensities, fractions of near-black and near-white pixels;
inference/input_stats.py), compared with the model package's training reference by
inference/drift.py (population stability index, docs/model.md "Model monitoring"). Nullable: rows
made before this revision, and images that were not analysed, have none — the drift window simply
does not count them.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inference_result") as batch:
        batch.add_column(sa.Column("input_stats", sa.JSON, nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite 3.35+ drops an unindexed, unconstrained column in place; a batch "move and copy"
        # of inference_result would drop a table that others reference.
        op.execute("ALTER TABLE inference_result DROP COLUMN input_stats")
    else:
        op.drop_column("inference_result", "input_stats")
