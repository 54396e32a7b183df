"""FHIR R4 search parameters: what we support, what we index, how a query string reads, what SQL it means.

Everything here is pure (no HTTP, no session): the registry of the parameters each resource type
supports (also the source of the CapabilityStatement's ``searchParam``), the extraction of index
rows from a resource as served, the parsing of a search's query/form pairs into a
:class:`SearchRequest`, and the SQLAlchemy Core expressions that match it against
:class:`~storage.models.FhirResource` and :class:`~storage.models.FhirSearchIndex`.

References are to the FHIR R4 "Search" page, http://hl7.org/fhir/R4/search.html, by its anchors
(``#prefix``, ``#date`` ...), which are stable across releases where the section numbers are not.

Decisions (each is restated where it is implemented):

* ``Prefer: handling`` (``#errors``): an *unknown or unsupported parameter* (a name we do not
  know, a chain, ``_has``, ``_tag``, an unsupported ``_sort`` key, ``_include:iterate``, ``_summary=text``)
  is an error in strict mode and a warning in lenient mode (the parameter is ignored; the caller puts
  the warnings in an OperationOutcome entry and leaves the parameter out of the self link).
  A *value that cannot be parsed* (a bad date, an unknown prefix, ``_count=abc``, a bad escape) is
  an error in both modes: "Where the content of the parameter is syntactically incorrect, servers
  SHOULD return an error". An *unsupported modifier* on a filter parameter (``code:below``,
  ``name:text``) is an error in both modes too: a modifier changes what the parameter means, so
  ignoring it would return an unrelated result set; R4 lists "an illegal or unacceptable modifier"
  among the errors and R5 says plainly that a server SHALL reject it. Empty parameters are ignored.
* Dates without a time zone are read as UTC (R4 ``#date`` says "the server's local time zone"; a
  gateway's local zone is an accident of deployment, UTC is the same everywhere).
* ``ap`` widens the searched range by one day on each side and matches any overlap (R4 ``#prefix``
  recommends 10 % of the distance to now, "but systems may choose other values"; a fixed day keeps
  parsing pure and suits report dates).
* Strings are indexed normalised (:func:`normalise`), so ``:exact`` is equality of normalised
  values, not the case- and accent-sensitive match of R4 ``#string``.
* Values are truncated to :data:`MAX_VALUE_LENGTH` characters in the index and in the query alike.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, false, not_, or_, select, true

from conf.errors import InvalidInputError
from storage.models import FhirResource, FhirSearchIndex

ParamType = Literal["token", "reference", "date", "string", "uri"]

#: The length of ``fhir_search_index.system`` / ``.value`` (``String(200)``).
MAX_VALUE_LENGTH = 200

#: Bounds on one search (each filter is a sub-query; an unbounded list is a denial of service).
MAX_FILTERS = 20
MAX_VALUES = 100

#: The open ends of a Period (R4 ``#date``: "a missing lower boundary is 'less than' any actual date").
#: Stored rather than NULL so that every date comparison is a plain indexed comparison.
MIN_DATE = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
MAX_DATE = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)

#: The comparison prefixes of R4 ``#prefix``; ``eq`` when none is written.
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")

#: How far ``ap`` widens the searched range on each side (see the module docstring).
APPROXIMATION = dt.timedelta(days=1)


# ------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SearchParamDef:
    """One search parameter as the CapabilityStatement declares it (R4 SearchParameter resource).

    ``expression`` is the R4 FHIRPath, ``targets`` the resource types a reference parameter may
    point to (empty for the other types).
    """

    name: str
    type: ParamType
    expression: str
    targets: tuple[str, ...] = ()
    documentation: str = ""


def _p(name: str, type_: ParamType, expression: str, documentation: str, targets: tuple[str, ...] = ()) -> SearchParamDef:
    return SearchParamDef(name=name, type=type_, expression=expression, targets=targets, documentation=documentation)


def _common(resource_type: str) -> list[SearchParamDef]:
    # R4 #all: defined for every resource; served from fhir_resource columns, never from index rows.
    return [
        _p("_id", "token", f"{resource_type}.id", "Logical id of this artifact"),
        _p("_lastUpdated", "date", f"{resource_type}.meta.lastUpdated", "When the resource version last changed"),
    ]


_SUBJECT_TARGETS = ("Group", "Device", "Patient", "Location")

_DEFINITIONS: dict[str, list[SearchParamDef]] = {
    "Patient": [
        _p("identifier", "token", "Patient.identifier", "A patient identifier"),
        _p(
            "name",
            "string",
            "Patient.name",
            "A server defined search that may match any of the string fields in the HumanName, including family, "
            "give, prefix, suffix, suffix, and/or text (here: family, given and text)",
        ),
        _p("family", "string", "Patient.name.family", "A portion of the family name of the patient"),
        _p("given", "string", "Patient.name.given", "A portion of the given name of the patient"),
        _p("birthdate", "date", "Patient.birthDate", "The patient's date of birth"),
        _p("gender", "token", "Patient.gender", "Gender of the patient"),
    ],
    "ImagingStudy": [
        _p(
            "identifier",
            "token",
            "ImagingStudy.identifier",
            "Identifiers for the Study, such as DICOM Study Instance UID and Accession number",
        ),
        _p("patient", "reference", "ImagingStudy.subject.where(resolve() is Patient)", "Who the study is about", ("Patient",)),
        _p("subject", "reference", "ImagingStudy.subject", "Who the study is about", ("Patient", "Device", "Group")),
        _p("started", "date", "ImagingStudy.started", "When the study was started"),
        _p("status", "token", "ImagingStudy.status", "The status of the study"),
        _p("modality", "token", "ImagingStudy.series.modality", "The modality of the series"),
        _p(
            "basedon",
            "reference",
            "ImagingStudy.basedOn",
            "The order for the image",
            ("CarePlan", "ServiceRequest", "Appointment", "AppointmentResponse", "Task"),
        ),
        _p("bodysite", "token", "ImagingStudy.series.bodySite", "The body site studied"),
    ],
    "Device": [
        _p("identifier", "token", "Device.identifier", "Instance id from manufacturer, owner, and others"),
        _p(
            "device-name",
            "string",
            "Device.deviceName.name | Device.type.coding.display | Device.type.text",
            "A server defined search that may match any of the string fields in Device.deviceName or Device.type.",
        ),
        _p("manufacturer", "string", "Device.manufacturer", "The manufacturer of the device"),
        _p("status", "token", "Device.status", "active | inactive | entered-in-error | unknown"),
    ],
    "Observation": [
        _p("identifier", "token", "Observation.identifier", "The unique id for a particular observation"),
        _p(
            "patient",
            "reference",
            "Observation.subject.where(resolve() is Patient)",
            "The subject that the observation is about (if patient)",
            ("Patient",),
        ),
        _p("subject", "reference", "Observation.subject", "The subject that the observation is about", _SUBJECT_TARGETS),
        _p("status", "token", "Observation.status", "The status of the observation"),
        _p("code", "token", "Observation.code", "The code of the observation type"),
        _p("category", "token", "Observation.category", "The classification of the type of observation"),
        _p(
            "date",
            "date",
            "Observation.effective",
            "Obtained date/time. If the obtained element is a period, a date that falls in the period",
        ),
        _p(
            "device",
            "reference",
            "Observation.device",
            "The Device that generated the observation data.",
            ("Device", "DeviceMetric"),
        ),
        _p(
            "derived-from",
            "reference",
            "Observation.derivedFrom",
            "Related measurements the observation is made from",
            ("DocumentReference", "ImagingStudy", "Media", "QuestionnaireResponse", "Observation", "MolecularSequence"),
        ),
        _p(
            "part-of",
            "reference",
            "Observation.partOf",
            "Part of referenced event",
            (
                "MedicationAdministration",
                "MedicationDispense",
                "MedicationStatement",
                "Procedure",
                "Immunization",
                "ImagingStudy",
            ),
        ),
        _p(
            "value-concept",
            "token",
            "(Observation.value as CodeableConcept)",
            "The value of the observation, if the value is a CodeableConcept",
        ),
    ],
    "ServiceRequest": [
        _p("identifier", "token", "ServiceRequest.identifier", "Identifiers assigned to this order"),
        _p(
            "patient",
            "reference",
            "ServiceRequest.subject.where(resolve() is Patient)",
            "Search by subject - a patient",
            ("Patient",),
        ),
        _p("subject", "reference", "ServiceRequest.subject", "Search by subject", ("Group", "Device", "Patient", "Location")),
        _p(
            "status", "token", "ServiceRequest.status",
            "draft | active | on-hold | revoked | completed | entered-in-error | unknown",
        ),
        _p("intent", "token", "ServiceRequest.intent", "proposal | plan | directive | order | original-order | ..."),
        _p("code", "token", "ServiceRequest.code", "What is being requested/ordered"),
        _p("category", "token", "ServiceRequest.category", "Classification of service"),
        _p("priority", "token", "ServiceRequest.priority", "routine | urgent | asap | stat"),
        _p("authored", "date", "ServiceRequest.authoredOn", "Date request signed"),
    ],
    "DiagnosticReport": [
        _p("identifier", "token", "DiagnosticReport.identifier", "An identifier for the report"),
        _p(
            "based-on",
            "reference",
            "DiagnosticReport.basedOn",
            "Reference to the service request",
            ("CarePlan", "MedicationRequest", "NutritionOrder", "ServiceRequest", "ImmunizationRecommendation"),
        ),
        _p(
            "patient",
            "reference",
            "DiagnosticReport.subject.where(resolve() is Patient)",
            "The subject of the report if a patient",
            ("Patient",),
        ),
        _p("subject", "reference", "DiagnosticReport.subject", "The subject of the report", _SUBJECT_TARGETS),
        _p("status", "token", "DiagnosticReport.status", "The status of the report"),
        _p(
            "code",
            "token",
            "DiagnosticReport.code",
            "The code for the report, as opposed to codes for the atomic results, which are the names on the "
            "observation resource referred to from the result",
        ),
        _p("category", "token", "DiagnosticReport.category", "Which diagnostic discipline/department created the report"),
        _p("date", "date", "DiagnosticReport.effective", "The clinically relevant time of the report"),
        _p("issued", "date", "DiagnosticReport.issued", "When the report was issued"),
        _p("result", "reference", "DiagnosticReport.result", "Link to an atomic result (observation resource)", ("Observation",)),
        _p(
            "performer",
            "reference",
            "DiagnosticReport.performer",
            "Who is responsible for the report",
            ("Practitioner", "Organization", "CareTeam", "PractitionerRole"),
        ),
        _p(
            "conclusion",
            "token",
            "DiagnosticReport.conclusionCode",
            "A coded conclusion (interpretation/impression) on the report",
        ),
        _p(
            "imaging-study",
            "reference",
            "DiagnosticReport.imagingStudy",
            "The imaging studies the report is about (DiagnosticReport.imagingStudy). Not an R4 standard search "
            "parameter: defined by Pneumo Gateway.",
            ("ImagingStudy",),
        ),
    ],
    "Subscription": [
        _p("status", "token", "Subscription.status", "The current state of the subscription"),
        _p("type", "token", "Subscription.channel.type", "The type of channel for the sent notifications"),
        _p("url", "uri", "Subscription.channel.endpoint", "The uri that will receive the notifications"),
        _p("criteria", "string", "Subscription.criteria", "The search rules used to determine when to send a notification"),
    ],
}

#: resource type -> parameter name -> definition; ``_id`` and ``_lastUpdated`` for every type.
SEARCH_PARAMS: Mapping[str, Mapping[str, SearchParamDef]] = MappingProxyType(
    {
        resource_type: MappingProxyType({d.name: d for d in _common(resource_type) + definitions})
        for resource_type, definitions in _DEFINITIONS.items()
    }
)

#: The parameters served from ``fhir_resource`` columns rather than from index rows.
COLUMN_PARAMS = frozenset({"_id", "_lastUpdated"})

#: ``_sort`` keys beyond ``_id``/``_lastUpdated``: the resource's own date, stored in ``fhir_resource.sort_date``.
SORT_DATE_PARAMS: Mapping[str, str] = MappingProxyType(
    {"DiagnosticReport": "date", "Observation": "date", "ImagingStudy": "started", "ServiceRequest": "authored"}
)

# R4 #all and the result parameters: known to FHIR, not supported here (unsupported, not unknown).
_UNSUPPORTED_STANDARD = frozenset(
    {
        "_tag",
        "_profile",
        "_security",
        "_source",
        "_text",
        "_content",
        "_list",
        "_has",
        "_type",
        "_query",
        "_filter",
        "_contained",
        "_containedType",
        "_score",
    }
)


def _definition(resource_type: str, param: str) -> SearchParamDef:
    try:
        return SEARCH_PARAMS[resource_type][param]
    except KeyError:
        raise InvalidInputError(f"unknown search parameter {param!r} for {resource_type}") from None


# ----------------------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class IndexEntry:
    """One ``fhir_search_index`` row, less the keys: token (``system``, ``value``), reference
    (``value`` = ``Type/id``), string (``value`` normalised), uri (``value``), date (``[low, high)``)."""

    param: str
    system: str | None = None
    value: str | None = None
    low: dt.datetime | None = None
    high: dt.datetime | None = None


def normalise(text: str) -> str:
    """The form strings are indexed and searched in (R4 ``#string``: case- and accent-insensitive).

    NFKD then the combining marks dropped (``é`` -> ``e``), case-folded, whitespace runs collapsed to
    one space and trimmed, then truncated to :data:`MAX_VALUE_LENGTH`.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _truncate(" ".join(stripped.casefold().split()))


def _truncate(value: str) -> str:
    return value[:MAX_VALUE_LENGTH]


def _walk(node: Any, path: str) -> list[Any]:
    """The values at a dotted *path*, lists flattened at every step (FHIRPath's implicit ``select``)."""
    current: list[Any] = [node]
    for step in path.split("."):
        following: list[Any] = []
        for item in current:
            if isinstance(item, Mapping) and step in item:
                child = item[step]
                following.extend(child if isinstance(child, list) else [child])
        current = following
    return [item for item in current if item is not None]


def _tokens(element: Any) -> list[tuple[str | None, str]]:
    """(system, code) of a code, boolean, Coding, CodeableConcept or Identifier (R4 ``#token``)."""
    if isinstance(element, bool):
        return [(None, "true" if element else "false")]
    if isinstance(element, str):
        return [(None, element)] if element else []
    if not isinstance(element, Mapping):
        return []
    if "coding" in element or ("text" in element and "code" not in element and "value" not in element):
        found: list[tuple[str | None, str]] = []
        for coding in element.get("coding") or []:
            found.extend(_tokens(coding))
        return found
    if "code" in element:  # Coding
        code = element.get("code")
        return [(element.get("system"), code)] if isinstance(code, str) and code else []
    value = element.get("value")  # Identifier
    return [(element.get("system"), value)] if isinstance(value, str) and value else []


_REFERENCE_TAIL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def _reference(element: Any) -> str | None:
    """``Type/id`` of a Reference: absolute URLs reduced to their tail, ``_history`` dropped, contained skipped."""
    reference = element.get("reference") if isinstance(element, Mapping) else None
    if not isinstance(reference, str) or not reference or reference.startswith("#"):
        return None
    match = _REFERENCE_TAIL.search(reference)
    return f"{match.group(1)}/{match.group(2)}" if match else reference


def _strings(element: Any) -> list[str]:
    """The strings of a string or HumanName (family, each given, text)."""
    if isinstance(element, str):
        return [element]
    if isinstance(element, Mapping):
        parts = [element.get("family"), *(element.get("given") or []), element.get("text")]
        return [part for part in parts if isinstance(part, str)]
    return []


def _date_range(element: Any) -> tuple[dt.datetime, dt.datetime] | None:
    """``[low, high)`` of a date, dateTime, instant or Period; None when there is nothing usable."""
    if isinstance(element, str):
        try:
            return parse_date(element)
        except InvalidInputError:
            return None  # not a FHIR date: the resource is not searchable by it rather than unprojectable
    if isinstance(element, Mapping) and ("start" in element or "end" in element):
        start = _date_range(element["start"]) if element.get("start") else None
        end = _date_range(element["end"]) if element.get("end") else None
        if start is None and end is None:
            return None
        return (start[0] if start else MIN_DATE, end[1] if end else MAX_DATE)
    return None


Extractor = Callable[[Mapping[str, Any]], list[IndexEntry]]


def _token_at(param: str, *paths: str) -> Extractor:
    def extract(resource: Mapping[str, Any]) -> list[IndexEntry]:
        return [
            IndexEntry(param, _truncate(system) if system else None, _truncate(code))
            for path in paths
            for element in _walk(resource, path)
            for system, code in _tokens(element)
        ]

    return extract


def _reference_at(param: str, path: str, only: str | None = None) -> Extractor:
    def extract(resource: Mapping[str, Any]) -> list[IndexEntry]:
        found = [_reference(element) for element in _walk(resource, path)]
        return [
            IndexEntry(param, value=_truncate(ref))
            for ref in found
            if ref is not None and (only is None or ref.startswith(only + "/"))
        ]

    return extract


def _string_at(param: str, *paths: str) -> Extractor:
    def extract(resource: Mapping[str, Any]) -> list[IndexEntry]:
        values = (normalise(text) for path in paths for element in _walk(resource, path) for text in _strings(element))
        return [IndexEntry(param, value=value) for value in values if value]

    return extract


def _uri_at(param: str, path: str) -> Extractor:
    def extract(resource: Mapping[str, Any]) -> list[IndexEntry]:
        return [IndexEntry(param, value=_truncate(v)) for v in _walk(resource, path) if isinstance(v, str) and v]

    return extract


def _date_at(param: str, *paths: str) -> Extractor:
    def extract(resource: Mapping[str, Any]) -> list[IndexEntry]:
        ranges = (_date_range(element) for path in paths for element in _walk(resource, path))
        return [IndexEntry(param, low=r[0], high=r[1]) for r in ranges if r is not None]

    return extract


_EFFECTIVE = ("effectiveDateTime", "effectivePeriod", "effectiveInstant")

_EXTRACTORS: Mapping[str, tuple[Extractor, ...]] = {
    "Patient": (
        _token_at("identifier", "identifier"),
        _string_at("name", "name"),
        _string_at("family", "name.family"),
        _string_at("given", "name.given"),
        _date_at("birthdate", "birthDate"),
        _token_at("gender", "gender"),
    ),
    "ImagingStudy": (
        _token_at("identifier", "identifier"),
        _reference_at("patient", "subject", only="Patient"),
        _reference_at("subject", "subject"),
        _date_at("started", "started"),
        _token_at("status", "status"),
        _token_at("modality", "series.modality"),
        _reference_at("basedon", "basedOn"),
        _token_at("bodysite", "series.bodySite"),
    ),
    "ServiceRequest": (
        _token_at("identifier", "identifier"),
        _reference_at("patient", "subject", only="Patient"),
        _reference_at("subject", "subject"),
        _token_at("status", "status"),
        _token_at("intent", "intent"),
        _token_at("code", "code"),
        _token_at("category", "category"),
        _token_at("priority", "priority"),
        _date_at("authored", "authoredOn"),
    ),
    "Device": (
        _token_at("identifier", "identifier"),
        _string_at("device-name", "deviceName.name", "type.coding.display", "type.text"),
        _string_at("manufacturer", "manufacturer"),
        _token_at("status", "status"),
    ),
    "Observation": (
        _token_at("identifier", "identifier"),
        _reference_at("patient", "subject", only="Patient"),
        _reference_at("subject", "subject"),
        _token_at("status", "status"),
        _token_at("code", "code"),
        _token_at("category", "category"),
        _date_at("date", *_EFFECTIVE),
        _reference_at("device", "device"),
        _reference_at("derived-from", "derivedFrom"),
        _reference_at("part-of", "partOf"),
        _token_at("value-concept", "valueCodeableConcept"),
    ),
    "DiagnosticReport": (
        _token_at("identifier", "identifier"),
        _reference_at("based-on", "basedOn"),
        _reference_at("patient", "subject", only="Patient"),
        _reference_at("subject", "subject"),
        _token_at("status", "status"),
        _token_at("code", "code"),
        _token_at("category", "category"),
        _date_at("date", *_EFFECTIVE),
        _date_at("issued", "issued"),
        _reference_at("result", "result"),
        _reference_at("performer", "performer"),
        _token_at("conclusion", "conclusionCode"),
        _reference_at("imaging-study", "imagingStudy"),
    ),
    "Subscription": (
        _token_at("status", "status"),
        _token_at("type", "channel.type"),
        _uri_at("url", "channel.endpoint"),
        _string_at("criteria", "criteria"),
    ),
}


def extract_index(resource_type: str, resource: Mapping[str, Any]) -> list[IndexEntry]:
    """The index rows of one resource (as served): one per searchable value, duplicates dropped.

    ``_id`` and ``_lastUpdated`` have no rows (they are ``fhir_resource`` columns); a type with no
    parameters (or one we do not know) has none at all. ``patient`` is ``subject`` when the subject
    is a Patient. A date that does not parse is left out rather than failing the projection.
    """
    entries: list[IndexEntry] = []
    seen: set[IndexEntry] = set()
    for extractor in _EXTRACTORS.get(resource_type, ()):
        for entry in extractor(resource):
            if entry not in seen:
                seen.add(entry)
                entries.append(entry)
    return entries


def date_range(resource_type: str, resource: Mapping[str, Any]) -> tuple[dt.datetime, dt.datetime] | None:
    """``fhir_resource.sort_date`` / ``sort_date_high``: the range ``[low, high)`` of the resource's own
    date, the :data:`SORT_DATE_PARAMS` parameter (``_sort`` and the ``date`` filter read the columns).

    DiagnosticReport and Observation: ``effective[x]`` (dateTime, instant, or a Period);
    ImagingStudy: ``started``; ServiceRequest: ``authoredOn``; anything else None. These elements are
    single-valued (0..1), so the row's columns say all the index rows would.
    """
    if resource_type in ("DiagnosticReport", "Observation"):
        for element in (*_walk(resource, "effectiveDateTime"), *_walk(resource, "effectiveInstant")):
            found = _date_range(element)
            if found is not None:
                return found
        for period in _walk(resource, "effectivePeriod"):
            start = _date_range(period.get("start")) if isinstance(period, Mapping) else None
            end = _date_range(period.get("end")) if isinstance(period, Mapping) else None
            if start is not None or end is not None:
                return (start[0] if start else MIN_DATE, end[1] if end else MAX_DATE)
        return None
    path = {"ImagingStudy": "started", "ServiceRequest": "authoredOn"}.get(resource_type)
    if path is None:
        return None
    for element in _walk(resource, path):
        found = _date_range(element)
        if found is not None:
            return found
    return None


def sort_date(resource_type: str, resource: Mapping[str, Any]) -> dt.datetime | None:
    """The start of :func:`date_range` (``_sort=date``)."""
    found = date_range(resource_type, resource)
    return None if found is None else found[0]


# -------------------------------------------------------------------------------------------- dates

_DATE = re.compile(
    r"(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d+))?)?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?)?)?)?",
    re.ASCII,
)


def _plus(moment: dt.datetime, delta: dt.timedelta) -> dt.datetime:
    try:
        return min(moment + delta, MAX_DATE)
    except OverflowError:
        return MAX_DATE if delta > dt.timedelta(0) else MIN_DATE


def parse_date(text: str) -> tuple[dt.datetime, dt.datetime]:
    """The half-open UTC range ``[low, high)`` a FHIR date, dateTime or instant covers (R4 ``#date``).

    Any precision: ``2024`` is the year, ``2024-03`` the month, ``2024-03-05`` the day,
    ``2024-03-05T10:00+01:00`` the minute, ``...T10:00:00+01:00`` the second, ``...T10:00:00.25Z``
    the hundredth (at most a microsecond). Minutes must accompany an hour (R4 ``#date``: "the
    minutes SHALL be present if an hour is present"). A time without a zone is UTC (module
    docstring). A space where the zone's ``+`` belongs is read as ``+``: an unencoded ``+`` in a
    query string arrives as a space. Raises :class:`InvalidInputError` for anything else.
    """
    candidate = text.replace(" ", "+")
    match = _DATE.fullmatch(candidate)
    if match is None:
        raise InvalidInputError(f"not a FHIR date, dateTime or instant: {text!r}")
    g = match.groupdict()
    try:
        year = int(g["year"])
        if g["month"] is None:
            low = dt.datetime(year, 1, 1, tzinfo=dt.UTC)
            return low, dt.datetime(year + 1, 1, 1, tzinfo=dt.UTC) if year < 9999 else MAX_DATE
        month = int(g["month"])
        if g["day"] is None:
            low = dt.datetime(year, month, 1, tzinfo=dt.UTC)
            following = (year + 1, 1) if month == 12 else (year, month + 1)
            return low, dt.datetime(*following, 1, tzinfo=dt.UTC) if following[0] <= 9999 else MAX_DATE
        day = int(g["day"])
        if g["hour"] is None:
            low = dt.datetime(year, month, day, tzinfo=dt.UTC)
            return low, _plus(low, dt.timedelta(days=1))
        zone = dt.UTC
        if g["zone"] not in (None, "Z"):
            sign = 1 if g["zone"][0] == "+" else -1
            hours, minutes = int(g["zone"][1:3]), int(g["zone"][4:6])
            if hours > 14 or minutes > 59:
                raise ValueError("time zone offset out of range")
            zone = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
        fraction = g["fraction"] or ""
        if g["second"] is None:
            unit = dt.timedelta(minutes=1)
        elif not fraction:
            unit = dt.timedelta(seconds=1)
        else:
            unit = dt.timedelta(microseconds=10 ** (6 - min(len(fraction), 6)))
        local = dt.datetime(
            year,
            month,
            day,
            int(g["hour"]),
            int(g["minute"]),
            int(g["second"] or 0),
            int(fraction[:6].ljust(6, "0")),
            tzinfo=zone,
        )
        low = local.astimezone(dt.UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidInputError(f"not a valid date: {text!r} ({exc})") from None
    return low, _plus(low, unit)


# ------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class ParsedValue:
    """One value of a filter (one side of an OR), unescaped and interpreted by the parameter's type.

    * token: ``system`` None = any system, ``""`` = no system (``|code``); ``value`` None = any
      code in ``system`` (``system|``).
    * reference: ``value`` is ``Type/id``; a bare ``id`` (no ``/``) when the parameter has several
      target types (it then matches ``T/id`` for each target ``T``); an absolute URL we cannot reduce
      is kept whole (and matches nothing: our references are relative).
    * string: ``value`` normalised (:func:`normalise`). uri: ``value`` as given.
    * date: ``prefix`` (``eq`` when none was written) and the search value's range ``[low, high)``.
    * ``:missing``: ``value`` is ``"true"`` or ``"false"``.

    ``raw`` is the value as written (escapes included), for self links and messages.
    """

    raw: str
    value: str | None = None
    system: str | None = None
    prefix: str | None = None
    low: dt.datetime | None = None
    high: dt.datetime | None = None


@dataclass(frozen=True)
class Filter:
    """One parameter occurrence: its values are ORed; separate filters (repeated names too) are ANDed."""

    param: str
    type: ParamType
    modifier: str | None
    values: tuple[ParsedValue, ...]


@dataclass(frozen=True)
class SortKey:
    param: str
    descending: bool = False


@dataclass(frozen=True)
class Include:
    """``_include`` / ``_revinclude`` (R4 ``#include``): ``source_type:param[:target_type]``."""

    source_type: str
    param: str
    target_type: str | None = None


@dataclass(frozen=True)
class SearchRequest:
    """A search, parsed. ``count`` is bounded by ``max_count``; 0 asks for the total only (R4 ``#count``).

    ``summary`` is ``"count"`` or None; ``cursor`` is our own opaque paging token, untouched;
    ``total`` is ``none``/``estimate``/``accurate`` or None; ``warnings`` are the parameters a
    lenient search ignored, for an OperationOutcome entry in the Bundle.
    """

    filters: tuple[Filter, ...] = ()
    count: int = 20
    sort: tuple[SortKey, ...] = ()
    includes: tuple[Include, ...] = ()
    revincludes: tuple[Include, ...] = ()
    summary: str | None = None
    elements: tuple[str, ...] = ()
    cursor: str | None = None
    total: str | None = None
    warnings: tuple[str, ...] = ()


def split_escaped(text: str, separator: str) -> list[str]:
    """Split at every *separator* not preceded by ``\\``; the parts keep their escapes (R4 ``#escaping``)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(ch)
            following = next(chars, None)
            if following is not None:
                current.append(following)
        elif ch == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    """Remove the ``\\`` escapes of ``\\,``, ``\\|``, ``\\$`` and ``\\\\``; any other ``\\`` is an error.

    R4 ``#escaping``: "The parameter value ``xx\\xx`` is illegal".
    """
    out: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            following = next(chars, None)
            if following not in (",", "|", "$", "\\"):
                raise InvalidInputError(f"illegal escape in search value {text!r} (only \\, \\| \\$ \\\\ are allowed)")
            out.append(following)
        else:
            out.append(ch)
    return "".join(out)


_MODIFIERS_BY_TYPE: Mapping[str, frozenset[str]] = {
    "string": frozenset({"missing", "exact", "contains"}),
    "token": frozenset({"missing", "not"}),
    "reference": frozenset({"missing"}),  # and :[type], checked against the targets
    "date": frozenset({"missing"}),
    "uri": frozenset({"missing"}),
}
_PREFIXED = re.compile(r"([a-z]{2})(\d.*)", re.ASCII | re.DOTALL)
_ELEMENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\[x\])?", re.ASCII)
_DIGITS = re.compile(r"\d+", re.ASCII)
_RELATIVE = re.compile(r"([A-Za-z][A-Za-z0-9]*)/([^/]+)(?:/_history/[^/]+)?")
_RESULT_PARAMS = frozenset({"_count", "_sort", "_include", "_revinclude", "_summary", "_elements", "_cursor", "_total"})
_ONCE = frozenset({"_count", "_sort", "_summary", "_elements", "_cursor", "_total"})


class _Parser:
    def __init__(self, resource_type: str, strict: bool) -> None:
        self.resource_type = resource_type
        self.strict = strict
        self.warnings: list[str] = []

    def unsupported(self, message: str) -> None:
        """R4 #errors, unknown and unsupported parameters: strict -> error, lenient -> ignored with a warning."""
        if self.strict:
            raise InvalidInputError(message)
        self.warnings.append(f"{message}: ignored")

    # ---- filters

    def filter(self, definition: SearchParamDef, modifier: str | None, raw: str) -> Filter | None:
        if (
            modifier is not None
            and modifier not in _MODIFIERS_BY_TYPE[definition.type]
            and not (definition.type == "reference" and modifier in definition.targets)
        ):
            # Always an error: see the module docstring (R4 #errors, R5 #modifiers "SHALL reject").
            raise InvalidInputError(
                f"unsupported modifier :{modifier} on search parameter {definition.name!r} ({definition.type})"
            )
        values = tuple(
            value for part in split_escaped(raw, ",") if part and (value := self.value(definition, modifier, part)) is not None
        )
        if not values:
            return None  # R4 #errors: "Empty parameters are not an error - they are just ignored"
        return Filter(param=definition.name, type=definition.type, modifier=modifier, values=values)

    def value(self, definition: SearchParamDef, modifier: str | None, raw: str) -> ParsedValue | None:
        if modifier == "missing":
            if raw not in ("true", "false"):
                raise InvalidInputError(f"{definition.name}:missing takes true or false, not {raw!r}")
            return ParsedValue(raw=raw, value=raw)
        kind = definition.type
        if kind == "token":
            return self.token(definition, raw)
        if kind == "reference":
            return self.reference(definition, modifier, raw)
        if kind == "date":
            return self.date(definition, raw)
        if kind == "string":
            text = normalise(unescape(raw))
            return ParsedValue(raw=raw, value=text) if text else None
        return ParsedValue(raw=raw, value=unescape(raw))  # uri

    def token(self, definition: SearchParamDef, raw: str) -> ParsedValue:
        """R4 #token: ``code``, ``system|code``, ``|code`` (no system), ``system|`` (any code in system)."""
        parts = split_escaped(raw, "|")
        if len(parts) == 1:
            return ParsedValue(raw=raw, value=unescape(parts[0]))
        if len(parts) > 2:
            raise InvalidInputError(f"token {definition.name}={raw!r}: more than one unescaped '|'")
        system, code = unescape(parts[0]), unescape(parts[1])
        if not system and not code:
            raise InvalidInputError(f"token {definition.name}={raw!r}: neither system nor code")
        return ParsedValue(raw=raw, system=system, value=code or None)

    def reference(self, definition: SearchParamDef, modifier: str | None, raw: str) -> ParsedValue:
        """R4 #reference: ``id``, ``Type/id``, ``Type/id/_history/v`` (version ignored: ours are unversioned),
        an absolute URL (its ``Type/id`` tail, R4: "a relative reference resolving to the same value as a
        specified absolute URL ... qualifies as a match"), and ``param:Type=id`` (R4 #modifiers)."""
        text = unescape(raw)
        if modifier is not None:  # :[type]
            if "/" in text:
                raise InvalidInputError(f"{definition.name}:{modifier}={raw!r}: with a type modifier the value is an id")
            return ParsedValue(raw=raw, value=f"{modifier}/{text}")
        if re.match(r"[A-Za-z][A-Za-z0-9+.\-]*:", text):  # absolute (http:, https:, urn:)
            tail = _REFERENCE_TAIL.search(text)
            return ParsedValue(raw=raw, value=f"{tail.group(1)}/{tail.group(2)}" if tail else text)
        if "/" in text:
            relative = _RELATIVE.fullmatch(text)
            if relative is None:
                raise InvalidInputError(f"not a reference: {definition.name}={raw!r} (expected id, Type/id or a URL)")
            return ParsedValue(raw=raw, value=f"{relative.group(1)}/{relative.group(2)}")
        if len(definition.targets) == 1:
            return ParsedValue(raw=raw, value=f"{definition.targets[0]}/{text}")
        return ParsedValue(raw=raw, value=text)

    def date(self, definition: SearchParamDef, raw: str) -> ParsedValue:
        """R4 #prefix and #date: an optional two-letter prefix, then a date of any precision."""
        text = unescape(raw)
        prefix = "eq"
        prefixed = _PREFIXED.fullmatch(text)
        if prefixed is not None:
            prefix, text = prefixed.group(1), prefixed.group(2)
            if prefix not in DATE_PREFIXES:
                raise InvalidInputError(
                    f"unknown prefix {prefix!r} in {definition.name}={raw!r} (one of {', '.join(DATE_PREFIXES)})"
                )
        low, high = parse_date(text)
        return ParsedValue(raw=raw, prefix=prefix, low=low, high=high)

    # ---- result parameters

    def count(self, raw: str) -> int:
        if not _DIGITS.fullmatch(raw):
            raise InvalidInputError(f"_count must be a non-negative integer, not {raw!r}")
        return int(raw)

    def sort(self, raw: str) -> tuple[SortKey, ...]:
        """R4 #sort: comma-separated keys, ``-`` for descending; only keys with a column behind them."""
        keys: list[SortKey] = []
        allowed = {"_id", "_lastUpdated"} | (
            {SORT_DATE_PARAMS[self.resource_type]} if self.resource_type in SORT_DATE_PARAMS else set()
        )
        for part in raw.split(","):
            descending = part.startswith("-")
            name = part[1:] if descending else part
            if not name:
                if descending:
                    raise InvalidInputError(f"_sort={raw!r}: '-' without a parameter")
                continue
            if name not in allowed:
                self.unsupported(
                    f"unsupported _sort key {name!r} for {self.resource_type} (supported: {', '.join(sorted(allowed))})"
                )
                continue
            if all(key.param != name for key in keys):
                keys.append(SortKey(name, descending))
        return tuple(keys)

    def include(self, name: str, modifier: str | None, raw: str) -> Include | None:
        """R4 #include: ``_include=Source:param[:Target]`` (Source the searched type), ``_revinclude=
        Source:param[:Target]`` (param pointing at the searched type). No ``:iterate``, no ``*``."""
        if modifier is not None:
            self.unsupported(f"{name}:{modifier} is not supported")
            return None
        parts = raw.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidInputError(f"{name}={raw!r}: expected SourceType:param or SourceType:param:TargetType")
        source, param = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        if param == "*":
            self.unsupported(f"{name}={raw!r}: wildcard includes are not supported")
            return None
        definition = SEARCH_PARAMS.get(source, {}).get(param)
        if definition is None or definition.type != "reference":
            self.unsupported(f"{name}={raw!r}: {param!r} is not a reference search parameter of {source}")
            return None
        if target is not None and target not in definition.targets:
            self.unsupported(f"{name}={raw!r}: {source}.{param} does not refer to {target}")
            return None
        if name == "_include" and source != self.resource_type:
            self.unsupported(f"_include={raw!r}: the source type must be {self.resource_type} (no :iterate)")
            return None
        if name == "_revinclude" and (
            (target is not None and target != self.resource_type) or self.resource_type not in definition.targets
        ):
            self.unsupported(f"_revinclude={raw!r}: {source}.{param} does not refer to {self.resource_type}")
            return None
        return Include(source, param, target)


def parse_search(
    resource_type: str, params: Sequence[tuple[str, str]], *, strict: bool, default_count: int, max_count: int
) -> SearchRequest:
    """Read a search's query/form pairs, in order, into a :class:`SearchRequest`.

    Repeated names are ANDed, commas inside a value ORed (``\\,`` is a literal comma, R4
    ``#escaping``). ``_format`` and ``_pretty`` belong to the HTTP layer and are
    skipped. *strict* is ``Prefer: handling=strict``: see the module docstring for what is an error in
    which mode. Result parameters other than ``_include``/``_revinclude`` may appear once (a second is
    an unsupported parameter: error when strict, else ignored with a warning).
    """
    if resource_type not in SEARCH_PARAMS:
        raise InvalidInputError(f"search is not supported on {resource_type}")
    parser = _Parser(resource_type, strict)
    filters: list[Filter] = []
    includes: list[Include] = []
    revincludes: list[Include] = []
    seen: set[str] = set()
    count = min(default_count, max_count)
    sort: tuple[SortKey, ...] = ()
    summary: str | None = None
    elements: tuple[str, ...] = ()
    cursor: str | None = None
    total: str | None = None
    for name, raw in params:
        if "\x00" in name or "\x00" in raw:
            raise InvalidInputError("search parameters cannot contain NUL characters")
        if name in ("_format", "_pretty"):
            continue
        if raw == "":
            continue  # R4 #errors: "Empty parameters are not an error - they are just ignored"
        base, _, modifier = name.partition(":")
        if base in _RESULT_PARAMS:
            if base in ("_include", "_revinclude"):
                include = parser.include(base, modifier or None, raw)
                target_list = includes if base == "_include" else revincludes
                if include is not None and include not in target_list:
                    target_list.append(include)
                continue
            if modifier:
                parser.unsupported(f"{name} is not supported")
                continue
            if base in _ONCE and base in seen:
                parser.unsupported(f"{base} given more than once")
                continue
            seen.add(base)
            if base == "_count":
                count = min(parser.count(raw), max_count)
            elif base == "_sort":
                sort = parser.sort(raw)
            elif base == "_summary":
                summary = _summary(parser, raw)
            elif base == "_elements":
                elements = _elements(raw)
            elif base == "_cursor":
                cursor = raw
            elif base == "_total":
                if raw not in ("none", "estimate", "accurate"):
                    raise InvalidInputError(f"_total must be none, estimate or accurate, not {raw!r}")
                total = raw
            continue
        definition = None if "." in name else SEARCH_PARAMS[resource_type].get(base)  # no chaining (R4 #chaining)
        if definition is None:
            if "." in name or base in _UNSUPPORTED_STANDARD:
                parser.unsupported(f"unsupported search parameter {name!r} for {resource_type}")
            else:
                parser.unsupported(f"unknown search parameter {name!r} for {resource_type}")
            continue
        parsed = parser.filter(definition, modifier or None, raw)
        if parsed is not None:
            filters.append(parsed)
    if len(filters) > MAX_FILTERS or sum(len(f.values) for f in filters) > MAX_VALUES:
        # Each filter is a sub-query: hundreds of them make one request cost the database seconds.
        raise InvalidInputError(
            f"too many search criteria: at most {MAX_FILTERS} parameters and {MAX_VALUES} values in all"
        )
    if len(includes) + len(revincludes) > MAX_FILTERS:
        raise InvalidInputError(f"too many _include/_revinclude parameters: at most {MAX_FILTERS}")
    return SearchRequest(
        filters=tuple(filters),
        count=count,
        sort=sort,
        includes=tuple(includes),
        revincludes=tuple(revincludes),
        summary=summary,
        elements=elements,
        cursor=cursor,
        total=total,
        warnings=tuple(parser.warnings),
    )


def _summary(parser: _Parser, raw: str) -> str | None:
    """R4 #summary: ``count`` (total only) is supported, ``false`` is the normal result; ``true``,
    ``text`` and ``data`` are unsupported (strict: error; lenient: full resources with a warning)."""
    if raw == "count":
        return "count"
    if raw == "false":
        return None
    if raw in ("true", "text", "data"):
        parser.unsupported(f"_summary={raw} is not supported (only count and false)")
        return None
    raise InvalidInputError(f"_summary must be true, text, data, count or false, not {raw!r}")


def _elements(raw: str) -> tuple[str, ...]:
    """R4 #elements: comma-separated top-level element names."""
    names: list[str] = []
    for part in raw.split(","):
        name = part.strip()
        if not name:
            continue
        if not _ELEMENT.fullmatch(name):
            raise InvalidInputError(f"_elements: {name!r} is not an element name")
        if name not in names:
            names.append(name)
    return tuple(names)


# ---------------------------------------------------------------------------------------------- SQL


def _index_exists(resource_type: str, param: str, *conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    """EXISTS an index row of the searched resource for *param* (and *conditions*), correlated on
    ``resource_pk`` and led by ``resource_type, param`` so that ``ix_fhir_search_value`` /
    ``ix_fhir_search_date`` serve it."""
    return (
        select(FhirSearchIndex.id)
        .where(
            FhirSearchIndex.resource_pk == FhirResource.id,
            FhirSearchIndex.resource_type == resource_type,
            FhirSearchIndex.param == param,
            *conditions,
        )
        .correlate(FhirResource)
        .exists()
    )


def _ranged(
    prefix: str, low: ColumnElement[Any], high: ColumnElement[Any], qlo: dt.datetime, qhi: dt.datetime
) -> ColumnElement[bool]:
    """R4 #prefix, a resource range ``[low, high)`` against the search range ``[qlo, qhi)``.

    eq  "the range of the search value fully contains the range of the target value"   low >= qlo and high <= qhi
    ne  "... does not fully contain ..."                                                not eq
    gt  "the range above the search value intersects the range of the target value"   high > qhi
    lt  "the range below the search value intersects the range of the target value"   low < qlo
    ge  gt or eq                                                                       low >= qlo or high > qhi
    le  lt or eq                                                                       high <= qhi or low < qlo
    sa  "does not overlap ..., and the range above the search value contains ..."     low >= qhi
    eb  "does not overlap ..., and the range below the search value contains ..."     high <= qlo
    ap  overlaps the search range widened by :data:`APPROXIMATION`                      low < qhi' and high > qlo'

    ("range above" is ``[qhi, ∞)`` and "range below" ``(-∞, qlo)``: a value inside the searched day is
    neither greater nor less than that day.) ``ge``/``le`` simplify as shown: if ``low >= qlo`` the target
    is either contained (eq) or runs past ``qhi`` (gt).
    """
    if prefix == "eq":
        return and_(low >= qlo, high <= qhi)
    if prefix == "ne":
        return or_(low < qlo, high > qhi)
    if prefix == "gt":
        return high > qhi
    if prefix == "lt":
        return low < qlo
    if prefix == "ge":
        return or_(low >= qlo, high > qhi)
    if prefix == "le":
        return or_(high <= qhi, low < qlo)
    if prefix == "sa":
        return low >= qhi
    if prefix == "eb":
        return high <= qlo
    if prefix == "ap":
        return and_(low < _plus(qhi, APPROXIMATION), high > _plus(qlo, -APPROXIMATION))
    raise InvalidInputError(f"unknown date prefix {prefix!r}")


def _instant(prefix: str, moment: ColumnElement[Any], qlo: dt.datetime, qhi: dt.datetime) -> ColumnElement[bool]:
    """R4 #date: an instant is "a fixed point in time with ... an effective width of 0": the range
    rules of :func:`_ranged` with ``low = high = t``, the point belonging to ``[qlo, qhi)`` when
    ``qlo <= t < qhi`` (``_lastUpdated``, a ``fhir_resource`` column)."""
    conditions: dict[str, ColumnElement[bool]] = {
        "eq": and_(moment >= qlo, moment < qhi),
        "ne": or_(moment < qlo, moment >= qhi),
        "gt": moment >= qhi,
        "lt": moment < qlo,
        "ge": moment >= qlo,
        "le": moment < qhi,
        "sa": moment >= qhi,
        "eb": moment < qlo,
        "ap": and_(moment >= _plus(qlo, -APPROXIMATION), moment < _plus(qhi, APPROXIMATION)),
    }
    try:
        return conditions[prefix]
    except KeyError:
        raise InvalidInputError(f"unknown date prefix {prefix!r}") from None


def _date_value(value: ParsedValue) -> tuple[str, dt.datetime, dt.datetime]:
    if value.low is None or value.high is None:
        raise InvalidInputError(f"date value {value.raw!r} has no range")
    return value.prefix or "eq", value.low, value.high


def _token_condition(value: ParsedValue) -> ColumnElement[bool]:
    conditions: list[ColumnElement[bool]] = []
    if value.system == "":
        conditions.append(FhirSearchIndex.system.is_(None))
    elif value.system is not None:
        conditions.append(FhirSearchIndex.system == _truncate(value.system))
    if value.value is not None:
        conditions.append(FhirSearchIndex.value == _truncate(value.value))
    return and_(true(), *conditions)


def _reference_candidates(definition: SearchParamDef, value: ParsedValue) -> list[str]:
    text = value.value or ""
    if "/" in text or ":" in text:
        return [_truncate(text)]
    return [_truncate(f"{target}/{text}") for target in definition.targets]


def _string_condition(modifier: str | None, value: ParsedValue) -> ColumnElement[bool]:
    """R4 #string: starts-with by default, ``:contains`` anywhere, ``:exact`` the whole (normalised) value.

    ``autoescape`` escapes ``%``, ``_`` and the escape character itself in the LIKE pattern.
    """
    text = _truncate(value.value or "")
    if modifier == "exact":
        return FhirSearchIndex.value == text
    if modifier == "contains":
        return FhirSearchIndex.value.contains(text, autoescape=True)
    return FhirSearchIndex.value.startswith(text, autoescape=True)


def _column_filter(resource_type: str, f: Filter) -> ColumnElement[bool]:
    """``_id`` (``fhir_resource.logical_id``) and ``_lastUpdated`` (``fhir_resource.last_updated``)."""
    if f.modifier == "missing":  # every resource has both
        return or_(*(true() if v.value == "false" else false() for v in f.values))
    if f.param == "_id":
        ids = [v.value for v in f.values if v.system in (None, "") and v.value is not None]
        matched = FhirResource.logical_id.in_(ids) if ids else false()
        return not_(matched) if f.modifier == "not" else matched
    column = FhirResource.last_updated.expression
    return or_(*(_instant(prefix, column, qlo, qhi) for prefix, qlo, qhi in map(_date_value, f.values)))


def filter_clause(resource_type: str, f: Filter) -> ColumnElement[bool]:
    """The WHERE condition of one filter on a query over ``fhir_resource`` (the searched rows).

    Index parameters become EXISTS subqueries on ``fhir_search_index`` correlated on ``resource_pk``;
    the values of one filter are ORed inside one EXISTS. ``:missing=true`` is NOT EXISTS any row of the
    parameter, ``:missing=false`` EXISTS one (R4 #modifiers). Token ``:not`` is NOT EXISTS a row matching
    any of the values, so it also matches resources with no value for the parameter (R4 #token).
    Date ``ne`` and the other prefixes apply row by row (a resource matches when one of its values does).
    """
    definition = _definition(resource_type, f.param)
    if f.param in COLUMN_PARAMS:
        return _column_filter(resource_type, f)
    if SORT_DATE_PARAMS.get(resource_type) == f.param:
        return _own_date_filter(f)
    if f.modifier == "missing":
        present = _index_exists(resource_type, f.param)
        return or_(*(not_(present) if v.value == "true" else present for v in f.values))
    conditions: list[ColumnElement[bool]]
    if definition.type == "token":
        conditions = [_token_condition(v) for v in f.values]
        if f.modifier == "not":
            return not_(_index_exists(resource_type, f.param, or_(*conditions)))
    elif definition.type == "reference":
        candidates = [c for v in f.values for c in _reference_candidates(definition, v)]
        conditions = [FhirSearchIndex.value.in_(candidates)]
    elif definition.type == "string":
        conditions = [_string_condition(f.modifier, v) for v in f.values]
    elif definition.type == "uri":
        conditions = [FhirSearchIndex.value.in_([_truncate(v.value or "") for v in f.values])]
    else:  # date
        low, high = FhirSearchIndex.low.expression, FhirSearchIndex.high.expression
        conditions = [_ranged(prefix, low, high, qlo, qhi) for prefix, qlo, qhi in map(_date_value, f.values)]
    return _index_exists(resource_type, f.param, or_(*conditions))


def _own_date_filter(f: Filter) -> ColumnElement[bool]:
    """A filter on the resource's own date (:data:`SORT_DATE_PARAMS`): the same range rules as the
    index rows, on the row's ``sort_date``/``sort_date_high`` columns (indexed with the type), so a
    broad ``date=ge…`` is a range scan rather than a join over every date of the type."""
    low, high = FhirResource.sort_date.expression, FhirResource.sort_date_high.expression
    if f.modifier == "missing":
        return or_(*(low.is_(None) if v.value == "true" else low.is_not(None) for v in f.values))
    return or_(*(_bounded(prefix, low, high, qlo, qhi) for prefix, qlo, qhi in map(_date_value, f.values)))


def _bounded(
    prefix: str, low: ColumnElement[Any], high: ColumnElement[Any], qlo: dt.datetime, qhi: dt.datetime
) -> ColumnElement[bool]:
    """:func:`_ranged`, plus the range bound its OR implies for ``ge``/``le`` (a non-empty range has
    ``low < high``: ``ge`` implies ``high > qlo``, ``le`` implies ``low < qhi``), so that the database
    can answer ``date=ge…`` with a range scan of ``ix_fhir_resource_type_date_high`` instead of
    filtering every row of the type. The result is the same rows."""
    condition = _ranged(prefix, low, high, qlo, qhi)
    if prefix == "ge":
        return and_(high > qlo, condition)
    if prefix == "le":
        return and_(low < qhi, condition)
    return condition


def sort_columns(resource_type: str, sort: Sequence[SortKey]) -> list[tuple[ColumnElement[Any], bool]]:
    """``(column, descending)`` for each key (R4 #sort): ``_id`` -> ``logical_id``, ``_lastUpdated`` ->
    ``last_updated``, ``date``/``started`` -> ``sort_date``. The caller adds ``fhir_resource.id`` last."""
    columns: list[tuple[ColumnElement[Any], bool]] = []
    for key in sort:
        if key.param == "_id":
            columns.append((FhirResource.logical_id.expression, key.descending))
        elif key.param == "_lastUpdated":
            columns.append((FhirResource.last_updated.expression, key.descending))
        elif SORT_DATE_PARAMS.get(resource_type) == key.param:
            columns.append((FhirResource.sort_date.expression, key.descending))
        else:
            raise InvalidInputError(f"unsupported _sort key {key.param!r} for {resource_type}")
    return columns
