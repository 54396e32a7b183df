"""AuditEvent search parameters (FHIR R4 AuditEvent "Search Parameters") over the audit log.

The audit log is not projected into ``fhir_resource``: it is served from ``audit_record`` itself
(:mod:`audit.fhir_audit_event` maps each record), searched through the derived index of
:mod:`audit.search_index`. Supported parameters, each repeatable (AND) with comma-separated values (OR):

* ``date`` (date, prefixes eq ne gt lt ge le sa eb ap): ``AuditEvent.recorded``, when the record was
  sealed into the log;
* ``type`` / ``subtype`` (token, ``code`` or ``system|code``): the DICOM Event ID (CID 400) /
  Event Type Code, e.g. ``type=110112`` or ``type=http://dicom.nema.org/resources/ontology/DCM|110112``;
* ``agent`` (reference; here the agent's identifier): ``agent.who.identifier.value`` (an AE title,
  an OAuth client id, ``APP@FACILITY`` for HL7) or ``agent.altId``;
* ``entity`` (reference; here also an identifier): ``entity.what`` - a FHIR reference
  (``DiagnosticReport/1.2.3``, with or without ``/_history/n``), a Study Instance UID (bare or
  ``urn:oid:``), a Patient ID, a node;
* ``patient`` (reference): ``Patient/<id>`` or ``<id>``: the records about that FHIR Patient: those
  naming the reference (FHIR access) and those naming any of its identifiers' Patient IDs (DICOM,
  HL7). Two issuers' patients who share a Patient ID are not told apart in records that name the
  Patient ID only (the audit event does not record the issuer).
* ``_count`` (page size, capped at ``fhir.max_count``) and ``_cursor`` (the ``next`` link's).

Results are newest first; paging is by sequence number, stable while the log grows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.search_index import AuditQuery, DateBound
from conf.errors import InvalidInputError
from fhir_api.facts import PatientFacts
from fhir_api.ids import patient_id as fhir_patient_id
from fhir_api.search_params import DATE_PREFIXES, MAX_VALUE_LENGTH, MAX_VALUES, parse_date, split_escaped, unescape
from fhir_api.store import get as get_resource
from storage.models import FhirResource, Patient

#: name -> (FHIR search parameter type, documentation); the CapabilityStatement lists these.
AUDIT_EVENT_PARAMS: Mapping[str, tuple[str, str]] = {
    "date": ("date", "When the record was sealed into the audit log (AuditEvent.recorded)"),
    "type": ("token", "The DICOM audit Event ID (CID 400), e.g. 110112 Query"),
    "subtype": ("token", "The DICOM audit Event Type Code, e.g. 110122 Login"),
    "agent": ("reference", "An agent's identifier (agent.who.identifier.value) or altId: AE title, OAuth client id"),
    "entity": ("reference", "What the event was about (entity.what): FHIR reference, Study Instance UID, Patient ID"),
    "patient": ("reference", "The records about this Patient (by reference and by its Patient IDs)"),
}
_CONTROL = frozenset({"_count", "_cursor"})
#: Parameters about the response, not the search (FHIR R4 http §3.1.0.1.10, §3.1.0.1.11).
_RESPONSE = frozenset({"_format", "_pretty"})


@dataclass(frozen=True)
class ParsedAuditSearch:
    query: AuditQuery
    warnings: tuple[str, ...]


def _values(name: str, raw: str) -> list[str]:
    if len(raw) > MAX_VALUE_LENGTH * MAX_VALUES:
        raise InvalidInputError(f"{name}: the value is too long")
    values = [unescape(v) for v in split_escaped(raw, ",")]
    if not values or any(not v for v in values) or len(values) > MAX_VALUES:
        raise InvalidInputError(f"{name}: empty value, or more than {MAX_VALUES} values")
    if any(len(v) > MAX_VALUE_LENGTH for v in values):
        raise InvalidInputError(f"{name}: a value is longer than {MAX_VALUE_LENGTH} characters")
    return values


def _date(raw: str) -> DateBound:
    prefix = raw[:2] if raw[:2] in DATE_PREFIXES else "eq"
    low, high = parse_date(raw[2:] if raw[:2] in DATE_PREFIXES else raw)
    return DateBound(prefix, low, high)


def patient_search_values(session: Session, value: str) -> list[str]:
    """What ``patient=<value>`` matches in the index: the reference and the Patient's identifiers."""
    logical_id = value.removeprefix("Patient/")
    if "/" in logical_id:
        raise InvalidInputError(f"patient: {value!r} is not a Patient reference")
    found = [f"Patient/{logical_id}"]
    resource = get_resource(session, "Patient", logical_id)
    if resource is not None:
        body = json.loads(resource.content)
        found += [str(i["value"]) for i in body.get("identifier", []) if isinstance(i, dict) and i.get("value")]
    return found


def parse_audit_search(
    session: Session, params: Sequence[tuple[str, str]], *, strict: bool, default_count: int, max_count: int
) -> ParsedAuditSearch:
    """The :class:`AuditQuery` of a search's parameters; unknown ones are warnings (errors when *strict*)."""
    values: dict[str, list[list[str]]] = {}
    dates: list[DateBound] = []
    warnings: list[str] = []
    count, cursor = default_count, None
    seen_control: set[str] = set()
    for raw_name, raw in params:
        name, _, modifier = raw_name.partition(":")
        if name in _RESPONSE:
            continue
        if name in _CONTROL:
            if name in seen_control:
                raise InvalidInputError(f"{name} may be given once")
            seen_control.add(name)
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 10:
                raise InvalidInputError(f"{name}: {raw[:40]!r} is not a non-negative integer")
            if name == "_count":
                count = min(int(raw), max_count)
            else:
                cursor = int(raw)
            continue
        if name not in AUDIT_EVENT_PARAMS or modifier:
            message = f"parameter {raw_name[:60]!r} is not supported on AuditEvent (see /fhir/metadata)"
            if strict:
                raise InvalidInputError(message)
            warnings.append(message)
            continue
        if name == "date":
            given = _values(name, raw)
            if len(given) > 1:
                raise InvalidInputError("date: one value per parameter (repeat date= for a range)")
            dates.append(_date(given[0]))
            continue
        parsed = _values(name, raw)
        if name == "patient":
            parsed = [match for value in parsed for match in patient_search_values(session, value)]
        elif name == "entity":
            parsed = [v.removeprefix("urn:oid:") if v.startswith("urn:oid:") else v for v in parsed]
        values.setdefault(name, []).append(parsed)
    if len(dates) + sum(len(v) for v in values.values()) > 20:
        raise InvalidInputError("too many search parameters (at most 20)")
    return ParsedAuditSearch(AuditQuery(values=values, dates=dates, count=count, before_seq=cursor), tuple(warnings))


class PatientReferences:
    """Given a Patient ID as an audit record holds it, the FHIR reference of that patient, when the
    gateway serves exactly one Patient with that ID (:func:`fhir_api.ids.patient_id`); else None.
    One per request or export (it caches its answers)."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._cache: dict[str, str | None] = {}

    def __call__(self, patient_number: str) -> str | None:
        if patient_number not in self._cache:
            self._cache[patient_number] = self._lookup(patient_number)
        return self._cache[patient_number]

    def _lookup(self, patient_number: str) -> str | None:
        issuers = self._session.execute(
            select(Patient.issuer).where(Patient.patient_id == patient_number).limit(2)
        ).scalars().all()
        if len(issuers) != 1:
            return None
        logical_id = fhir_patient_id(PatientFacts(patient_id=patient_number, issuer=issuers[0]))
        served = self._session.execute(
            select(FhirResource.id).where(FhirResource.resource_type == "Patient", FhirResource.logical_id == logical_id,
                                          FhirResource.version_id > 0)
        ).first()
        return f"Patient/{logical_id}" if served is not None else None
