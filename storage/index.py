"""Upserting the patient/study/series/instance index.

Concurrent associations routinely deliver instances of the same study at the same moment, so
parents are created with ``INSERT ... ON CONFLICT DO NOTHING`` and then read back: whichever
transaction wins, both end up pointing at the same row (PostgreSQL and SQLite alike).
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.metadata import InstanceMetadata
from storage.models import Instance, Patient, Series, Study, utcnow


def insert_ignore(session: Session, model: type[Any], values: dict[str, Any], conflict: list[str]) -> None:
    """INSERT that silently does nothing when *conflict* columns already exist."""
    statement = _insert_ignore(session.get_bind().dialect.name, model.__table__, tuple(conflict))
    session.execute(statement, values)


@functools.lru_cache(maxsize=64)
def _insert_ignore(dialect: str, table: Table, conflict: tuple[str, ...]) -> Any:
    """The statement for :func:`insert_ignore`, built once per table (its values are bound per call).

    Built on the Core table, not the ORM class: an ORM-enabled INSERT would take the session's
    bulk-insert path. Building the statement with ``.values(...)`` on every call cost more than
    executing it (an ``infer`` job re-arms two jobs; each FHIR resource version is one call)."""
    module: Any = postgresql if dialect == "postgresql" else sqlite
    return module.insert(table).on_conflict_do_nothing(index_elements=list(conflict))


def _update_if_given(row: Any, values: dict[str, Any]) -> None:
    """Newer headers refresh demographics, but an empty value never erases a known one."""
    for key, value in values.items():
        if value is not None and getattr(row, key) != value:
            setattr(row, key, value)


def upsert_hierarchy(session: Session, meta: InstanceMetadata, *, refresh: bool = False) -> Series:
    """Make sure the patient, study and series of *meta* exist; return the series row.

    Fast path: most instances belong to a series we already hold (a CR study is a handful of
    images; a CT series hundreds), and re-upserting three parents per instance would triple
    the statements on the hot C-STORE path. Demographics are refreshed when a new series of
    the study arrives, or when *refresh* says the header is a replacement's (it may correct them).
    """
    known = session.execute(
        select(Series).where(Series.series_instance_uid == meta.series_instance_uid)
    ).scalar_one_or_none()
    if known is not None and not refresh:
        return known
    now = utcnow()
    insert_ignore(
        session,
        Patient,
        {"patient_id": meta.patient_id, "issuer": meta.issuer_of_patient_id, "created_at": now, "updated_at": now},
        ["patient_id", "issuer"],
    )
    patient = session.execute(
        select(Patient).where(Patient.patient_id == meta.patient_id, Patient.issuer == meta.issuer_of_patient_id)
    ).scalar_one()
    _update_if_given(patient, {"name": meta.patient_name, "birth_date": meta.patient_birth_date, "sex": meta.patient_sex})

    insert_ignore(
        session,
        Study,
        {"study_instance_uid": meta.study_instance_uid, "patient_pk": patient.id, "created_at": now, "updated_at": now},
        ["study_instance_uid"],
    )
    study = session.execute(select(Study).where(Study.study_instance_uid == meta.study_instance_uid)).scalar_one()
    if refresh and study.patient_pk != patient.id:
        study.patient_pk = patient.id  # a replacement re-assigned the study (corrected Patient ID)
    _update_if_given(
        study,
        {
            "study_date": meta.study_date,
            "study_time": meta.study_time,
            "accession_number": meta.accession_number,
            "study_id": meta.study_id,
            "description": meta.study_description,
            "referring_physician": meta.referring_physician,
        },
    )

    insert_ignore(
        session,
        Series,
        {"series_instance_uid": meta.series_instance_uid, "study_pk": study.id, "created_at": now},
        ["series_instance_uid"],
    )
    series = session.execute(select(Series).where(Series.series_instance_uid == meta.series_instance_uid)).scalar_one()
    _update_if_given(
        series,
        {
            "modality": meta.modality,
            "series_number": meta.series_number,
            "body_part_examined": meta.body_part_examined,
            "description": meta.series_description,
        },
    )
    return series


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.execute(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).scalar_one_or_none()


def add_instance(
    session: Session,
    meta: InstanceMetadata,
    *,
    transfer_syntax_uid: str,
    relative_path: str,
    size: int,
    sha256: str,
    origin: str,
    calling_ae: str | None,
    received_at: dt.datetime | None = None,
) -> Instance:
    series = upsert_hierarchy(session, meta)
    now = received_at or utcnow()
    instance = Instance(
        sop_instance_uid=meta.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        series_pk=series.id,
        instance_number=meta.instance_number,
        transfer_syntax_uid=transfer_syntax_uid,
        path=relative_path,
        size=size,
        sha256=sha256,
        origin=origin,
        calling_ae=calling_ae,
        received_at=now,
        updated_at=now,
    )
    session.add(instance)
    session.flush()
    return instance


def replace_instance(
    session: Session,
    instance: Instance,
    meta: InstanceMetadata,
    *,
    transfer_syntax_uid: str,
    relative_path: str,
    size: int,
    sha256: str,
    calling_ae: str | None,
    when: dt.datetime,
) -> tuple[int, int]:
    """Point *instance* at replacement content under the same SOP Instance UID and count a new
    revision (results of earlier revisions stop counting: :attr:`Instance.revision`).

    Every header-derived field is refreshed, the parents too (a replacement may correct
    demographics, or even move the instance to another series). Returns the primary keys of the
    instance's study and of the one it belonged to before (the same unless it moved; both must
    be re-derived)."""
    previous_study_pk = session.execute(select(Series.study_pk).where(Series.id == instance.series_pk)).scalar_one()
    series = upsert_hierarchy(session, meta, refresh=True)
    instance.series_pk = series.id
    instance.sop_class_uid = meta.sop_class_uid
    instance.instance_number = meta.instance_number
    instance.transfer_syntax_uid = transfer_syntax_uid
    instance.path = relative_path
    instance.size = size
    instance.sha256 = sha256
    instance.calling_ae = calling_ae
    instance.updated_at = when
    instance.revision = (instance.revision or 0) + 1
    session.flush()
    return series.study_pk, int(previous_study_pk)
