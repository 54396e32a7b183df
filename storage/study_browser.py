"""The operator console's study list and study page: read-only queries over the index.

Why a module of its own, and why shaped like this: the console lists studies newest first over a
store of 100,000 and more, filtered by what an operator asks ("today's not-analysed studies",
"studies whose report did not reach the PACS"). A page must cost the same on the first day and
after a year, so:

* the list is keyset-paged on ``(study.created_at, study.id)`` (index ``ix_study_created_at_id``,
  migration 0015): a page is an index range scan, never ``OFFSET``;
* filters are semi-joins (``study.id IN (subquery)``), which the planner may run either way round;
* what each row shows besides the study (current result, delivery state, modalities, image count)
  is fetched for the page's rows only, in a few batched queries, never per row.

``received`` means when *we* first received the study (``study.created_at``), not the Study Date.
Dates in :class:`StudyFilter` are UTC calendar days; the web layer converts a local day if it
wants one. Reading only: nothing here writes, and nothing here is audited (the web layer audits
what the operator looked at, since only it knows who that was).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, Integer, Select, String, and_, case, cast, exists, func, literal, or_, select, union_all
from sqlalchemy.orm import Session, aliased

from conf.errors import InvalidInputError
from storage.job_kinds import DELIVER_JOB
from storage.models import (
    InferenceResult,
    Instance,
    InstanceOrigin,
    Job,
    JobState,
    Patient,
    Series,
    Study,
    StudyResult,
    StudyStatus,
)
from storage.outbox import STUDY_RESULT_SUBJECT_PREFIX
from storage.payload_subject import DeliverySubject
from storage.study_results import NEGATIVE_LABEL, POSITIVE_LABEL, image_outcomes

#: The SOP classes of our generated SR (every Structured Report class is under this root, PS3.4 Annex O).
SR_CLASS_ROOT = "1.2.840.10008.5.1.4.1.1.88."
#: The largest page :func:`list_studies` returns.
MAX_PAGE = 500

ResultFilter = Literal["positive", "negative", "not-analysed", "pending"]
DeliveryFilter = Literal["none", "pending", "done", "failed"]
DeliveryState = Literal["none", "pending", "done", "failed"]

_ACTIVE = (JobState.PENDING.value, JobState.RUNNING.value)
_REPORTED = (StudyStatus.FINAL.value, StudyStatus.AMENDED.value)


@dataclass(frozen=True)
class StudyFilter:
    """What the study list is narrowed to; every field None means "no condition".

    ``received_from``/``received_to``: UTC days, both inclusive, on when we first received the study.
    ``modality``: a series of the study with that modality holds a received image.
    ``result``: the current study result's ``positive``/``negative`` label (status final or
    amended), ``not-analysed``, or ``pending`` (no study result yet).
    ``delivery``: the study's deliveries taken together (:func:`delivery_state`).
    ``text``: an exact Patient ID, Accession Number or Study Instance UID (no wildcards: each is an
    index lookup, and a partial Patient ID would list other patients' studies to whoever typed it).
    """

    received_from: dt.date | None = None
    received_to: dt.date | None = None
    modality: str | None = None
    result: ResultFilter | None = None
    delivery: DeliveryFilter | None = None
    text: str | None = None


@dataclass(frozen=True)
class StudyRow:
    """One study as the list shows it.

    ``images``: received images (not our SR/summary image). ``result_status``: ``pending`` (no
    study result yet), ``final``, ``amended`` or ``not-analysed``; label, probability and threshold
    are the current version's. ``not_analysed_reasons``: (reason, images) of the current version,
    most frequent first (filled for any status: an analysed study may have images that were not).
    ``delivery_state``: see :func:`delivery_state`.
    """

    study_pk: int
    study_instance_uid: str
    received_at: dt.datetime
    study_date: str | None
    study_description: str | None
    accession_number: str | None
    patient_id: str
    patient_name: str | None
    modalities: tuple[str, ...]
    images: int
    result_status: str
    result_label: str | None
    probability: float | None
    threshold: float | None
    not_analysed_reasons: tuple[tuple[str, int], ...]
    delivery_state: DeliveryState


@dataclass(frozen=True)
class StudyPage:
    """One page of :func:`list_studies`; ``next_cursor`` is None on the last page."""

    rows: tuple[StudyRow, ...]
    next_cursor: str | None


@dataclass(frozen=True)
class PatientInfo:
    patient_id: str
    issuer: str
    name: str | None
    birth_date: str | None
    sex: str | None


@dataclass(frozen=True)
class ImageRow:
    """One received image and its newest inference result for its current revision.

    ``result_status``: a ResultStatus (``ok``, ``not-applicable``, ``failed``: a dead-lettered
    analysis counts as failed, with the job's first error line as ``reason``), or None when there
    is no result yet; ``waiting``: then, whether its analysis is still queued or running.
    """

    instance_pk: int
    sop_instance_uid: str
    series_instance_uid: str
    modality: str | None
    instance_number: int | None
    received_at: dt.datetime
    result_status: str | None
    label: str | None
    probability: float | None
    threshold: float | None
    reason: str | None
    model_id: str | None
    model_version: str | None
    waiting: bool


@dataclass(frozen=True)
class ResultVersion:
    """One version of the study result (what the EHR was told, newest first in :class:`StudyDetail`)."""

    version: int
    status: str
    label: str | None
    probability: float | None
    threshold: float | None
    images: int
    analysed: int
    reasons: tuple[tuple[str, int], ...]
    model_id: str | None
    model_version: str | None
    created_at: dt.datetime


@dataclass(frozen=True)
class GeneratedObjectRow:
    """An object we made for the study: ``kind`` ``sr`` (the TID 1500 report) or ``summary-image``;
    ``path`` is relative to the file store; ``source_sop_instance_uid``: the image it reports on."""

    instance_pk: int
    sop_instance_uid: str
    sop_class_uid: str
    kind: Literal["sr", "summary-image"]
    path: str
    created_at: dt.datetime
    source_sop_instance_uid: str | None


@dataclass(frozen=True)
class StudyDelivery:
    """One delivery of something of the study (its SR or summary image, a study result version)."""

    job_id: int
    channel: str
    destination: str
    subject: str
    state: str
    attempts: int
    last_error: str | None
    updated_at: dt.datetime


@dataclass(frozen=True)
class StudyDetail:
    """Everything the study page shows; sequences are in display order."""

    row: StudyRow
    patient: PatientInfo
    images: tuple[ImageRow, ...]  # by series, then instance number
    result_versions: tuple[ResultVersion, ...]  # newest first
    generated: tuple[GeneratedObjectRow, ...]  # oldest first
    deliveries: tuple[StudyDelivery, ...]  # newest first


# -- the cursor ---------------------------------------------------------------------------------


def encode_cursor(created_at: dt.datetime, study_pk: int) -> str:
    """The opaque position after the study (*created_at*, *study_pk*).

    The check digits are not a secret (every position is one the reader may list anyway): they
    turn a mangled or hand-edited cursor into a clear 400 instead of a silently different page."""
    body = f"{created_at.astimezone(dt.UTC).isoformat()}|{study_pk}"
    check = hashlib.sha256(body.encode()).hexdigest()[:8]
    return base64.urlsafe_b64encode(f"{body}|{check}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, int]:
    """The position a cursor of :func:`encode_cursor` names; InvalidInputError if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, pk, check = raw.split("|")
        if hashlib.sha256(f"{when}|{pk}".encode()).hexdigest()[:8] != check:
            raise ValueError("check digits")
        created_at = dt.datetime.fromisoformat(when)
        if created_at.tzinfo is None:
            raise ValueError("naive")
        return created_at, int(pk)
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise InvalidInputError("malformed page cursor") from exc


# -- filters ------------------------------------------------------------------------------------


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def _current_results() -> Select[Any]:
    """The study pks of current (newest) study result versions; narrow it with ``.where``."""
    newer = aliased(StudyResult)
    return select(StudyResult.study_pk).where(
        ~exists().where(newer.study_pk == StudyResult.study_pk, newer.version > StudyResult.version)
    )


def _result_condition(result: ResultFilter) -> ColumnElement[bool]:
    if result == "pending":
        return ~exists().where(StudyResult.study_pk == Study.id)
    if result == "not-analysed":
        return Study.id.in_(_current_results().where(StudyResult.status == StudyStatus.NOT_ANALYSED.value))
    label = POSITIVE_LABEL if result == "positive" else NEGATIVE_LABEL
    return Study.id.in_(_current_results().where(StudyResult.status.in_(_REPORTED), StudyResult.label == label))


def _result_subject() -> ColumnElement[str]:
    return literal(STUDY_RESULT_SUBJECT_PREFIX) + cast(StudyResult.id, String)


def _result_pk_of_subject() -> ColumnElement[int | None]:
    """The study result pk a delivery's subject names (NULL for other subjects). The CASE makes
    sure no SOP Instance UID is ever cast to an integer, whatever order the database evaluates in."""
    subject = DeliverySubject(Job.payload)
    start = len(STUDY_RESULT_SUBJECT_PREFIX) + 1
    return case((subject.startswith(STUDY_RESULT_SUBJECT_PREFIX), cast(func.substr(subject, start), Integer)))


def _objects_delivered(states: Sequence[str] | None) -> Select[Any]:
    query = (
        select(Series.study_pk)
        .join(Instance, Instance.series_pk == Series.id)
        .join(Job, Job.instance_pk == Instance.id)
        .where(Job.kind == DELIVER_JOB)
    )
    return query if states is None else query.where(Job.state.in_(states))


def _results_delivered(states: Sequence[str] | None) -> Select[Any]:
    query = select(StudyResult.study_pk).join(Job, DeliverySubject(Job.payload) == _result_subject()).where(
        Job.kind == DELIVER_JOB
    )
    return query if states is None else query.where(Job.state.in_(states))


def _few_with_deliveries(states: Sequence[str]) -> ColumnElement[bool]:
    """The study has a delivery in *states*, for states that few deliveries are in (dead letters,
    the queue): the matching deliveries are gathered first, from the job index, then their studies."""
    results = select(StudyResult.study_pk).where(
        StudyResult.id.in_(
            select(_result_pk_of_subject()).where(Job.kind == DELIVER_JOB, Job.state.in_(states), Job.instance_pk.is_(None))
        )
    )
    return Study.id.in_(select(union_all(_objects_delivered(states), results).subquery().c[0]))


def _has_deliveries(states: Sequence[str]) -> ColumnElement[bool]:
    """The study has a delivery in *states*, for states most deliveries are in (done): checked
    study by study, newest first, so a page stops after its rows instead of visiting every delivery.
    One EXISTS over a UNION: an OR of two EXISTS would let PostgreSQL hash all of one of them."""
    either = union_all(
        _objects_delivered(states).where(Series.study_pk == Study.id).correlate(Study),
        _results_delivered(states).where(StudyResult.study_pk == Study.id).correlate(Study),
    ).subquery()
    return exists(select(either.c[0]))


def _lacks_deliveries(states: Sequence[str] | None) -> ColumnElement[bool]:
    """The study has no delivery in *states* (in any state when None): two anti-joins."""
    return and_(
        ~exists(_objects_delivered(states).where(Series.study_pk == Study.id)),
        ~exists(_results_delivered(states).where(StudyResult.study_pk == Study.id)),
    )


def _delivery_condition(delivery: DeliveryFilter) -> ColumnElement[bool]:
    failed = [JobState.FAILED.value]
    if delivery == "failed":
        return _few_with_deliveries(failed)
    if delivery == "pending":
        return _few_with_deliveries(_ACTIVE) & _lacks_deliveries(failed)
    if delivery == "done":
        return _has_deliveries([JobState.DONE.value]) & _lacks_deliveries([*failed, *_ACTIVE])
    return _lacks_deliveries(None)


def _text_condition(text: str) -> ColumnElement[bool]:
    by_patient = select(Study.id).join(Patient, Study.patient_pk == Patient.id).where(Patient.patient_id == text)
    matches = union_all(
        select(Study.id).where(Study.study_instance_uid == text),
        select(Study.id).where(Study.accession_number == text),
        by_patient,
    ).subquery()
    return Study.id.in_(select(matches.c[0]))


def filter_conditions(flt: StudyFilter) -> list[ColumnElement[bool]]:
    """The WHERE conditions on :class:`Study` that *flt* stands for."""
    conditions: list[ColumnElement[bool]] = []
    if flt.received_from is not None:
        conditions.append(Study.created_at >= _day_start(flt.received_from))
    if flt.received_to is not None:
        conditions.append(Study.created_at < _day_start(flt.received_to + dt.timedelta(days=1)))
    if flt.modality:
        conditions.append(
            Study.id.in_(
                select(Series.study_pk)
                .join(Instance, Instance.series_pk == Series.id)
                .where(Series.modality == flt.modality, Instance.origin == InstanceOrigin.RECEIVED.value)
            )
        )
    if flt.result is not None:
        conditions.append(_result_condition(flt.result))
    if flt.delivery is not None:
        conditions.append(_delivery_condition(flt.delivery))
    text = (flt.text or "").strip()
    if text:
        conditions.append(_text_condition(text))
    return conditions


# -- per-page extras ----------------------------------------------------------------------------


def delivery_state(states: Iterable[str]) -> DeliveryState:
    """The study's deliveries taken together: ``failed`` if any is dead-lettered, else ``pending``
    if any is queued or running, else ``done`` if there is any, else ``none``."""
    found = set(states)
    if JobState.FAILED.value in found:
        return "failed"
    if found & set(_ACTIVE):
        return "pending"
    return "done" if found else "none"


def _study_deliveries(session: Session, study_pks: Sequence[int]) -> dict[int, list[Job]]:
    """The delivery jobs of each study in *study_pks* (both kinds of subject), newest first."""
    found: dict[int, list[Job]] = {pk: [] for pk in study_pks}
    if not study_pks:
        return found
    objects = (
        select(Series.study_pk, Job)
        .join(Instance, Instance.series_pk == Series.id)
        .join(Job, Job.instance_pk == Instance.id)
        .where(Series.study_pk.in_(study_pks), Job.kind == DELIVER_JOB)
    )
    results = (
        select(StudyResult.study_pk, Job)
        .join(Job, DeliverySubject(Job.payload) == _result_subject())
        .where(StudyResult.study_pk.in_(study_pks), Job.kind == DELIVER_JOB)
    )
    for query in (objects, results):
        for study_pk, job in session.execute(query):
            found[study_pk].append(job)
    for jobs in found.values():
        jobs.sort(key=lambda job: job.id, reverse=True)
    return found


def _current_by_study(session: Session, study_pks: Sequence[int]) -> dict[int, StudyResult]:
    """The newest version of each study's result (all versions of a page's studies are few)."""
    found: dict[int, StudyResult] = {}
    for row in session.execute(
        select(StudyResult).where(StudyResult.study_pk.in_(study_pks)).order_by(StudyResult.version)
    ).scalars():
        found[row.study_pk] = row  # the newest wins
    return found


def _images_by_study(session: Session, study_pks: Sequence[int]) -> dict[int, dict[str, int]]:
    """Received images per study and modality (a series without Modality counts under "")."""
    found: dict[int, dict[str, int]] = {pk: {} for pk in study_pks}
    query = (
        select(Series.study_pk, Series.modality, Instance.id)
        .join(Instance, Instance.series_pk == Series.id)
        .where(Series.study_pk.in_(study_pks), Instance.origin == InstanceOrigin.RECEIVED.value)
    )
    for study_pk, modality, _ in session.execute(query):
        counts = found[study_pk]
        counts[modality or ""] = counts.get(modality or "", 0) + 1
    return found


def _reasons(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        return ()
    return tuple((str(item.get("reason", "")), int(item.get("images", 0))) for item in value if isinstance(item, dict))


_ROW_COLUMNS = (
    Study.id, Study.study_instance_uid, Study.created_at, Study.study_date, Study.description,
    Study.accession_number, Patient.patient_id, Patient.name,
)


def _rows(session: Session, base: Sequence[Any]) -> list[StudyRow]:
    """:class:`StudyRow`s for *base* (tuples of :data:`_ROW_COLUMNS`), with the extras in batches."""
    pks = [int(row[0]) for row in base]
    if not pks:
        return []
    current = _current_by_study(session, pks)
    images = _images_by_study(session, pks)
    deliveries = _study_deliveries(session, pks)
    rows = []
    for pk, uid, created_at, study_date, description, accession, patient_id, patient_name in base:
        result = current.get(pk)
        counts = images.get(pk, {})
        rows.append(
            StudyRow(
                study_pk=pk,
                study_instance_uid=uid,
                received_at=created_at,
                study_date=study_date,
                study_description=description,
                accession_number=accession,
                patient_id=patient_id,
                patient_name=patient_name,
                modalities=tuple(sorted(m for m in counts if m)),
                images=sum(counts.values()),
                result_status=StudyStatus.PENDING.value if result is None else result.status,
                result_label=None if result is None else result.label,
                probability=None if result is None else result.probability,
                threshold=None if result is None else result.threshold,
                not_analysed_reasons=() if result is None else _reasons(result.reasons),
                delivery_state=delivery_state(job.state for job in deliveries.get(pk, [])),
            )
        )
    return rows


# -- the list and the page ----------------------------------------------------------------------


def list_studies(session: Session, flt: StudyFilter, *, limit: int = 50, after: str | None = None) -> StudyPage:
    """One page of studies matching *flt*, newest received first (ties: higher pk first).

    *after*: the ``next_cursor`` of the previous page (InvalidInputError when it is not one);
    *limit*: 1 to :data:`MAX_PAGE`. Studies received while an operator pages appear on page one,
    never shifted into later pages: the cursor is a position, not an offset.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInputError(f"page size must be between 1 and {MAX_PAGE}")
    conditions = filter_conditions(flt)
    if after is not None:
        created_at, pk = decode_cursor(after)
        conditions.append(or_(Study.created_at < created_at, (Study.created_at == created_at) & (Study.id < pk)))
    # The page's ids first, then their columns: the patient is joined to the page's rows only.
    page = (
        select(Study.id, Study.created_at).where(*conditions)
        .order_by(Study.created_at.desc(), Study.id.desc()).limit(limit + 1).subquery()
    )
    query = (
        select(*_ROW_COLUMNS).select_from(page).join(Study, Study.id == page.c.id)
        .join(Patient, Study.patient_pk == Patient.id).order_by(page.c.created_at.desc(), page.c.id.desc())
    )
    base = list(session.execute(query))
    more = len(base) > limit
    rows = _rows(session, base[:limit])
    next_cursor = encode_cursor(rows[-1].received_at, rows[-1].study_pk) if more and rows else None
    return StudyPage(tuple(rows), next_cursor)


def study_detail(session: Session, study_instance_uid: str) -> StudyDetail | None:
    """The study page of *study_instance_uid*, or None when we hold no such study."""
    base = list(
        session.execute(
            select(*_ROW_COLUMNS).join(Patient, Study.patient_pk == Patient.id)
            .where(Study.study_instance_uid == study_instance_uid)
        )
    )
    if not base:
        return None
    row = _rows(session, base)[0]
    study = session.execute(select(Study).where(Study.id == row.study_pk)).scalar_one()
    patient = study.patient
    return StudyDetail(
        row=row,
        patient=PatientInfo(patient.patient_id, patient.issuer, patient.name, patient.birth_date, patient.sex),
        images=_images(session, row.study_pk),
        result_versions=_versions(session, row.study_pk),
        generated=_generated(session, row.study_pk),
        deliveries=tuple(_delivery(job) for job in _study_deliveries(session, [row.study_pk])[row.study_pk]),
    )


def _images(session: Session, study_pk: int) -> tuple[ImageRow, ...]:
    outcomes = {outcome.instance_pk: outcome for outcome in image_outcomes(session, study_pk)}
    query = (
        select(Instance.id, Instance.sop_instance_uid, Series.series_instance_uid, Series.modality,
               Instance.instance_number, Instance.received_at)
        .join(Series, Instance.series_pk == Series.id)
        .where(Series.study_pk == study_pk, Instance.origin == InstanceOrigin.RECEIVED.value)
        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    )
    images = []
    for pk, sop_uid, series_uid, modality, number, received_at in session.execute(query):
        outcome = outcomes.get(pk)
        images.append(
            ImageRow(
                instance_pk=pk, sop_instance_uid=sop_uid, series_instance_uid=series_uid, modality=modality,
                instance_number=number, received_at=received_at,
                result_status=None if outcome is None else outcome.status,
                label=None if outcome is None else outcome.label,
                probability=None if outcome is None else outcome.probability,
                threshold=None if outcome is None else outcome.threshold,
                reason=None if outcome is None else outcome.reason,
                model_id=None if outcome is None else outcome.model_id,
                model_version=None if outcome is None else outcome.model_version,
                waiting=False if outcome is None else outcome.waiting,
            )
        )
    return tuple(images)


def _versions(session: Session, study_pk: int) -> tuple[ResultVersion, ...]:
    rows = session.execute(
        select(StudyResult).where(StudyResult.study_pk == study_pk).order_by(StudyResult.version.desc())
    ).scalars()
    return tuple(
        ResultVersion(
            version=r.version, status=r.status, label=r.label, probability=r.probability, threshold=r.threshold,
            images=r.images, analysed=r.analysed, reasons=_reasons(r.reasons), model_id=r.model_id,
            model_version=r.model_version, created_at=r.created_at,
        )
        for r in rows
    )


def _generated(session: Session, study_pk: int) -> tuple[GeneratedObjectRow, ...]:
    generated = list(
        session.execute(
            select(Instance)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == study_pk, Instance.origin == InstanceOrigin.GENERATED.value)
            .order_by(Instance.received_at, Instance.id)
        ).scalars()
    )
    if not generated:
        return ()
    pks = [instance.id for instance in generated]
    source = aliased(Instance)
    sources: dict[int, str] = {}
    for sr_pk, sc_pk, uid in session.execute(
        select(InferenceResult.sr_instance_pk, InferenceResult.sc_instance_pk, source.sop_instance_uid)
        .join(source, InferenceResult.instance_pk == source.id)
        .join(Series, source.series_pk == Series.id)
        # From the study's images (instance_pk is indexed; sr/sc_instance_pk are not).
        .where(Series.study_pk == study_pk, source.origin == InstanceOrigin.RECEIVED.value)
        .where(or_(InferenceResult.sr_instance_pk.in_(pks), InferenceResult.sc_instance_pk.in_(pks)))
    ):
        for pk in (sr_pk, sc_pk):
            if pk is not None:
                sources[pk] = uid
    return tuple(
        GeneratedObjectRow(
            instance_pk=instance.id, sop_instance_uid=instance.sop_instance_uid, sop_class_uid=instance.sop_class_uid,
            kind="sr" if instance.sop_class_uid.startswith(SR_CLASS_ROOT) else "summary-image",
            path=instance.path, created_at=instance.received_at, source_sop_instance_uid=sources.get(instance.id),
        )
        for instance in generated
    )


def _delivery(job: Job) -> StudyDelivery:
    return StudyDelivery(
        job_id=job.id,
        channel=str(job.payload.get("channel", "")),
        destination=str(job.payload.get("destination", "")),
        subject=str(job.payload.get("subject", "")),
        state=job.state,
        attempts=job.attempts,
        last_error=job.last_error,
        updated_at=job.updated_at,
    )
