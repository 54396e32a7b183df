"""The PATIENT level of the Patient Root Query/Retrieve Information Model (PS3.4 C.6.1).

Patient Root is a four-level hierarchy — PATIENT, STUDY, SERIES, IMAGE. Its three lower levels
are those of the Study Root model with the patient attributes moved one level up; since we are
lenient about the hierarchy (keys of the query level and the levels above it are all matched,
:mod:`storage.query`), a Patient Root query at STUDY, SERIES or IMAGE level is evaluated by
:mod:`storage.query` unchanged. What this module adds is the PATIENT level itself:

* C-FIND (C.6.1.1.2, Table C.6-1): one response per patient holding at least one study, matched
  on the patient keys only (PatientName, PatientID, IssuerOfPatientID, PatientBirthDate,
  PatientSex — the same matching rules as everywhere: wildcards, PN case-insensitive, date
  ranges); keys of lower levels are ignored and returned empty; NumberOfPatientRelatedStudies /
  Series / Instances (C.3.4) are computed when asked for.
* C-MOVE / C-GET at PATIENT level (C.4.2.2.1): the identifier must carry the unique key
  PatientID as a single value without wildcards (IssuerOfPatientID, when given, narrows it):
  every instance of that patient is selected, never "everyone whose ID looks like this".

No I/O beyond the session it is handed, and values are never logged (they are PHI).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import Session

from storage.models import Instance, Patient, Series, Study
from storage.query import (
    Query,
    QueryError,
    QueryLevel,
    RetrieveMatch,
    build_response,
    instances_matching,
    parse_query,
)

PATIENT_LEVEL = "PATIENT"

#: The matching keys of the PATIENT level (PS3.4 Table C.6-1) that our index holds.
PATIENT_KEYS = frozenset({"PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex"})

#: Return keys computed over the patient's studies (PS3.4 C.3.4), keyword -> what is counted.
COMPUTED_PATIENT_KEYS: dict[str, Any] = {
    "NumberOfPatientRelatedStudies": Study.id,
    "NumberOfPatientRelatedSeries": Series.id,
    "NumberOfPatientRelatedInstances": Instance.id,
}

_CONTROL = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"})


def is_patient_level(identifier: Dataset) -> bool:
    return str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper() == PATIENT_LEVEL


def parse_patient_query(identifier: Dataset) -> Query:
    """A PATIENT level identifier as a :class:`~storage.query.Query` whose conditions are on
    patient attributes only; every key asked for stays in ``requested`` (lower-level ones are
    answered empty, C.4.1.1.3.2)."""
    patient_only = Dataset()
    for element in identifier:
        if element.tag.group == 0x0002 or element.tag.is_private:
            continue
        keyword = element.keyword or keyword_for_tag(element.tag)
        if keyword == "QueryRetrieveLevel":
            continue
        if keyword in PATIENT_KEYS or keyword in _CONTROL:
            patient_only.add(element)
        else:  # a lower level's key: asked for, never matched (universal)
            patient_only.add_new(element.tag, element.VR, [] if element.VR == "SQ" else None)
    patient_only.QueryRetrieveLevel = QueryLevel.STUDY.value  # patient keys are STUDY keys there
    parsed = parse_query(patient_only)
    conditions = tuple(c for c in parsed.conditions if c.keyword in PATIENT_KEYS)
    return Query(parsed.level, conditions, parsed.requested, parsed.unique_values)


def _patients_select(query: Query) -> Any:
    has_study = exists().where(Study.patient_pk == Patient.id)
    clauses: list[ColumnElement[bool]] = [has_study, *(c.clause for c in query.conditions)]
    return select(Patient).where(*clauses).order_by(Patient.id)


def find_patients(
    session: Session, identifier: Dataset, *, retrieve_ae_title: str, batch: int = 500
) -> Iterator[Dataset]:
    """Evaluate a PATIENT level C-FIND identifier (raises :class:`QueryError` on bad values)."""
    query = parse_patient_query(identifier)
    patients = session.execute(_patients_select(query)).scalars().all()
    for start in range(0, len(patients), batch):
        chunk = patients[start : start + batch]
        counts = _patient_counts(session, query, [p.id for p in chunk])
        for patient in chunk:
            response = build_response(query, (patient,), {}, retrieve_ae_title=retrieve_ae_title)
            response.QueryRetrieveLevel = PATIENT_LEVEL
            for keyword, per_patient in counts.items():
                setattr(response, keyword, per_patient.get(patient.id, 0))
            yield response


def _patient_counts(session: Session, query: Query, patient_pks: Sequence[int]) -> dict[str, dict[int, int]]:
    """The C.3.4 counts the requestor asked for, one statement per key."""
    out: dict[str, dict[int, int]] = {}
    for keyword, counted in COMPUTED_PATIENT_KEYS.items():
        if not query.asks_for(keyword) or not patient_pks:
            continue
        statement = select(Study.patient_pk, func.count(func.distinct(counted))).where(Study.patient_pk.in_(patient_pks))
        if counted is not Study.id:
            statement = statement.join(Series, Series.study_pk == Study.id)
        if counted is Instance.id:
            statement = statement.join(Instance, Instance.series_pk == Series.id)
        out[keyword] = {pk: int(n) for pk, n in session.execute(statement.group_by(Study.patient_pk)).all()}
    return out


def patient_retrieve_matches(session: Session, identifier: Dataset) -> list[RetrieveMatch]:
    """Every stored instance of the patient a PATIENT level C-MOVE / C-GET names."""
    patient_id = str(identifier.get("PatientID", "") or "").strip()
    if not patient_id or "*" in patient_id or "?" in patient_id or "\\" in patient_id:
        raise QueryError("a PATIENT level retrieve needs PatientID (a single value, no wildcards)")
    return instances_matching(session, parse_patient_query(identifier))
