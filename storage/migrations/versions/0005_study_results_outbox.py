"""Study results, registered models, re-armable jobs and a channel-neutral outbox.

* ``study_result``: one row per version of a study's result (final / amended / not-analysed).
* ``model``: the identity of every model version that judged images.
* ``job.rerun_after``: a job re-armed while running goes back to pending when it completes.
* ``job.priority``: lower runs first among runnable jobs (an SR's delivery before a picture's).
* ``delivery_attempt``: ``channel`` and ``subject`` (what was carried) instead of the DICOM-only
  ``sop_instance_uid``; ``peer_status`` (text in the channel's terms) instead of ``dimse_status``.
* ``deliver`` jobs: payloads name their channel and subject; dedup keys become
  ``deliver:<channel>:<destination>:<subject>``.
* ``summary`` jobs are gone: the ``infer`` job draws the summary image after committing the SR.
  An unfinished summary job becomes a re-run of its image's ``infer`` job, which finds the
  result recorded and draws only the picture.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("manufacturer", sa.String(64), nullable=False),
        sa.Column("device_uid", sa.String(64), nullable=False),
        sa.Column("intended_use", sa.Text, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("registered_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("model_id", "version", name="uq_model_id_version"),
    )
    op.create_table(
        "study_result",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_pk", sa.Integer, sa.ForeignKey("study.id"), nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("label", sa.String(32)),
        sa.Column("probability", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("images", sa.Integer, nullable=False),
        sa.Column("analysed", sa.Integer, nullable=False),
        sa.Column("reasons", sa.JSON, nullable=False),
        sa.Column("deciding_result_pk", sa.Integer, sa.ForeignKey("inference_result.id")),
        sa.Column("model_id", sa.String(64)),
        sa.Column("model_version", sa.String(32)),
        sa.Column("basis", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False, index=True),
        sa.UniqueConstraint("study_pk", "version", name="uq_study_result_version"),
    )
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("rerun_after", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("delivery_attempt") as batch:
        batch.add_column(sa.Column("channel", sa.String(32), nullable=False, server_default="dicom"))
        batch.alter_column("sop_instance_uid", new_column_name="subject", existing_type=sa.String(64),
                           type_=sa.String(200), existing_nullable=False)
        batch.add_column(sa.Column("peer_status", sa.String(32), nullable=True))
    _convert_attempt_statuses()
    with op.batch_alter_table("delivery_attempt") as batch:
        batch.drop_column("dimse_status")
    _convert_jobs()


def _convert_attempt_statuses() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, dimse_status FROM delivery_attempt WHERE dimse_status IS NOT NULL")).all()
    for attempt_id, status in rows:
        bind.execute(
            sa.text("UPDATE delivery_attempt SET peer_status = :s WHERE id = :i"),
            {"s": f"0x{int(status):04X}", "i": attempt_id},
        )


def _convert_jobs() -> None:
    """Rewrite ``deliver`` payloads/keys and fold ``summary`` jobs into their ``infer`` jobs."""
    bind = op.get_bind()
    job = sa.table(
        "job",
        sa.column("id", sa.Integer),
        sa.column("kind", sa.String),
        sa.column("dedup_key", sa.String),
        sa.column("instance_pk", sa.Integer),
        sa.column("payload", sa.JSON),
        sa.column("state", sa.String),
    )
    instance = sa.table("instance", sa.column("id", sa.Integer), sa.column("sop_instance_uid", sa.String))
    deliveries = bind.execute(
        sa.select(job.c.id, job.c.payload, instance.c.sop_instance_uid)
        .select_from(job.outerjoin(instance, job.c.instance_pk == instance.c.id))
        .where(job.c.kind == "deliver")
    ).all()
    for job_id, payload, sop_uid in deliveries:
        destination = str((payload or {}).get("destination", ""))
        subject = sop_uid or ""
        bind.execute(
            job.update().where(job.c.id == job_id).values(
                payload={"channel": "dicom", "destination": destination, "subject": subject},
                dedup_key=f"deliver:dicom:{destination}:{subject}",
            )
        )
    summaries = bind.execute(sa.select(job.c.id, job.c.instance_pk, job.c.state).where(job.c.kind == "summary")).all()
    for job_id, instance_pk, state in summaries:
        if state != "done" and instance_pk is not None:
            bind.execute(
                job.update()
                .where(job.c.kind == "infer", job.c.instance_pk == instance_pk, job.c.state != "running")
                .values(state="pending")
            )
        bind.execute(sa.text("DELETE FROM job WHERE id = :i"), {"i": job_id})


def downgrade() -> None:
    with op.batch_alter_table("delivery_attempt") as batch:
        batch.add_column(sa.Column("dimse_status", sa.Integer))
        batch.drop_column("peer_status")
        batch.alter_column("subject", new_column_name="sop_instance_uid", existing_type=sa.String(200),
                           type_=sa.String(64), existing_nullable=False)
        batch.drop_column("channel")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("priority")
        batch.drop_column("rerun_after")
    op.drop_table("study_result")
    op.drop_table("model")
