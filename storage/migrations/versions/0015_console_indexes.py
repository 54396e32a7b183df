"""Indexes for the operator console's read side (storage/study_browser.py, storage/throughput.py).

* ``ix_study_created_at_id`` on ``study (created_at, id)``: the study list is newest first and
  keyset-paged on exactly these columns, so a page is an index range scan, not a sort of every study.
* ``ix_job_delivery_subject`` on the delivery subject in ``job.payload``
  (:class:`storage.payload_subject.DeliverySubject`: ``payload ->> 'subject'`` on PostgreSQL,
  ``json_extract(payload, '$.subject')`` on SQLite): a study's HL7/FHIR deliveries are found by
  their subject ``study-result/<pk>``; without it every page would scan the whole outbox.
* ``ix_delivery_attempt_finished_at``: deliveries per minute over the last hour.

Indexes only: nothing is rewritten, and the downgrade drops them.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.payload_subject import DeliverySubject

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_study_created_at_id", "study", ["created_at", "id"])
    op.create_index("ix_job_delivery_subject", "job", [DeliverySubject(sa.column("payload"))])
    op.create_index("ix_delivery_attempt_finished_at", "delivery_attempt", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_delivery_attempt_finished_at", table_name="delivery_attempt")
    op.drop_index("ix_job_delivery_subject", table_name="job")
    op.drop_index("ix_study_created_at_id", table_name="study")
