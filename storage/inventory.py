"""What the store holds, for an operator (``pneumo instances``): each instance with its kind and
what became of it, including *why* nothing was produced for an image.

An instance's outcome is derived from two rows: its ``infer`` job (is the work still queued,
running, or dead-lettered?) and its newest inference result (what the analysis said: ``ok``,
``not-applicable`` with the rule that excluded the image, ``failed`` with the cause). The reason
text is shown as stored: it is written by the analysis (rule names, error classes) and never holds
patient data. Generated objects (our SR and summary image) have no analysis of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from storage.job_kinds import INFER_JOB
from storage.models import InferenceResult, Instance, InstanceOrigin, Job, JobState, ResultStatus, Series, Study

#: PS3.4 B.5: the Structured Reporting storage SOP classes (and Key Object Selection) share this root.
_SR_ROOT = "1.2.840.10008.5.1.4.1.1.88."
#: PS3.4 B.5: Secondary Capture Image Storage and its multi-frame variants (…1.7, …1.7.1 to …1.7.4).
_SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def instance_kind(sop_class_uid: str) -> str:
    """``SR``, ``SC`` or ``image``: what an operator needs to tell a report from a picture."""
    if sop_class_uid.startswith(_SR_ROOT):
        return "SR"
    if sop_class_uid == _SC_CLASS or sop_class_uid.startswith(_SC_CLASS + "."):
        return "SC"
    return "image"


@dataclass(frozen=True)
class Outcome:
    """What became of one instance: ``outcome`` is one word, ``reason`` says why (or None)."""

    outcome: str
    reason: str | None = None


def instance_outcome(
    origin: str, job_state: str | None, job_error: str | None, result_status: str | None, result_reason: str | None
) -> Outcome:
    """The outcome of one instance from its ``infer`` job and its newest result (pure).

    Work in progress comes first (a job pending or running again, e.g. for replaced content,
    makes any earlier result provisional); then the result, with the job's error added when the
    job was dead-lettered after it (the summary image failed); a dead-lettered job without a
    result is ``failed`` with its last error.
    """
    if job_state in (JobState.PENDING, JobState.RUNNING):
        return Outcome(job_state)
    job_failure = f"job failed: {_first_line(job_error) or 'no detail'}" if job_state == JobState.FAILED else None
    if result_status is not None:
        why = result_reason if result_status != ResultStatus.OK else None
        return Outcome(result_status, "; ".join(r for r in (why, job_failure) if r) or None)
    if job_failure is not None:
        return Outcome("failed", _first_line(job_error))
    if job_state is not None:
        return Outcome(job_state)
    if origin == InstanceOrigin.GENERATED:
        return Outcome("generated")
    return Outcome("not-queued", "no analysis job for this instance")


def _first_line(text: str | None) -> str | None:
    stripped = (text or "").strip()
    return stripped.splitlines()[0][:300] if stripped else None


def list_instances(session: Session) -> list[dict[str, Any]]:
    """Every stored instance, oldest first, as the documented ``pneumo instances --json`` rows
    (without ``path``, which the caller resolves against the file store)."""
    newest_result = (
        select(InferenceResult.instance_pk, func.max(InferenceResult.id).label("result_id"))
        .group_by(InferenceResult.instance_pk)
        .subquery()
    )
    rows = session.execute(
        select(
            Instance, Series.series_instance_uid, Study.study_instance_uid, Job.state, Job.last_error,
            InferenceResult.status, InferenceResult.reason, InferenceResult.label, InferenceResult.probability,
        )
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .outerjoin(Job, and_(Job.instance_pk == Instance.id, Job.kind == INFER_JOB))
        .outerjoin(newest_result, newest_result.c.instance_pk == Instance.id)
        .outerjoin(InferenceResult, InferenceResult.id == newest_result.c.result_id)
        .order_by(Instance.id)
    ).all()
    listed = []
    for inst, series_uid, study_uid, job_state, job_error, status, reason, label, probability in rows:
        outcome = instance_outcome(inst.origin, job_state, job_error, status, reason)
        listed.append({
            "sop_instance_uid": inst.sop_instance_uid,
            "sop_class_uid": inst.sop_class_uid,
            "kind": instance_kind(inst.sop_class_uid),
            "study_instance_uid": study_uid,
            "series_instance_uid": series_uid,
            "transfer_syntax_uid": inst.transfer_syntax_uid,
            "size": inst.size,
            "sha256": inst.sha256,
            "received_at": inst.received_at.isoformat(),
            "calling_ae": inst.calling_ae,
            "origin": inst.origin,
            "relative_path": inst.path,
            "job_state": job_state,
            "outcome": outcome.outcome,
            "reason": outcome.reason,
            "label": label,
            "probability": None if probability is None else round(float(probability), 6),
        })
    return listed
