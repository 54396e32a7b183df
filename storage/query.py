"""C-FIND matching and C-MOVE/C-GET selection over the patient/study/series/instance index.

The Study Root Query/Retrieve Information Model (PS3.4 C.6.2) is a three-level hierarchy —
STUDY (with the patient attributes folded in), SERIES, IMAGE — and our index holds exactly
that hierarchy, so an identifier maps to one SQL SELECT over the joined tables. Attribute
matching follows PS3.4 C.2.2.2:

* universal matching (C.2.2.2.3): a zero-length key (or a lone ``*``) matches everything and
  only asks for the value to be returned;
* single value matching (C.2.2.2.1): equality; case-sensitive except for PN, which we match
  case-insensitively as the standard allows and users expect;
* wildcard matching (C.2.2.2.4): ``*`` and ``?`` in the text VRs (AE, CS, LO, LT, PN, SH, ST,
  UC, UT), compiled to an anchored regular expression that SQLite (SQLAlchemy's registered
  REGEXP) and PostgreSQL (``~``) evaluate the same way — case folding is spelled out as
  character classes so it does not depend on the backend's collation;
* list of UID matching (C.2.2.2.2): a backslash-separated list of UIDs;
* range matching (C.2.2.2.5): ``A-B``, ``A-``, ``-B`` for DA and TM.

Like most SCPs we are lenient with the hierarchy (C.4.1.2.1): keys of the query level and the
levels above it are all matched (an extended, relational-style search), and keys of lower
levels are ignored and returned empty instead of failing the query.

The module does no I/O of its own beyond the session it is handed, and never logs values (they
are PHI).
"""

from __future__ import annotations

import enum
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import ColumnElement, Select, and_, exists, false, func, or_, select, true
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql import Executable

from storage.models import Instance, Patient, Series, Study
from storage.uids import is_valid_uid


class QueryLevel(enum.StrEnum):
    """Query/Retrieve Level (0008,0052) values of the Study Root model (PS3.4 C.6.2.1)."""

    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


_DEPTH: dict[QueryLevel, int] = {QueryLevel.STUDY: 0, QueryLevel.SERIES: 1, QueryLevel.IMAGE: 2}

#: The unique key of each level (PS3.4 C.6.2.1.1); C-MOVE/C-GET need it at the retrieve level.
UNIQUE_KEYS: dict[QueryLevel, str] = {
    QueryLevel.STUDY: "StudyInstanceUID",
    QueryLevel.SERIES: "SeriesInstanceUID",
    QueryLevel.IMAGE: "SOPInstanceUID",
}

#: UTF-8 (PS3.3 C.12.1.1.2): the index holds decoded text, and UTF-8 can re-encode all of it.
UTF8 = "ISO_IR 192"

MatchKind = Literal["text", "pn", "uid", "date", "time", "int"]


class QueryError(ValueError):
    """The identifier cannot be evaluated: maps to "Identifier does not match SOP Class"
    (0xA900, PS3.4 C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4) at the DIMSE boundary."""


@dataclass(frozen=True)
class KeySpec:
    """One attribute we can match and return: its level, column and matching rules."""

    keyword: str
    level: QueryLevel
    column: InstrumentedAttribute[Any]
    kind: MatchKind


def _specs(*items: tuple[str, QueryLevel, InstrumentedAttribute[Any], MatchKind]) -> dict[str, KeySpec]:
    return {keyword: KeySpec(keyword, level, column, kind) for keyword, level, column, kind in items}


_S, _SE, _I = QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE

#: Matching keys backed by a column (PS3.4 C.6.2.1.2, Tables C.6-5 to C.6-7). Patient
#: attributes are study-level keys in the Study Root model.
MATCHING_KEYS: dict[str, KeySpec] = _specs(
    ("PatientName", _S, Patient.name, "pn"),
    ("PatientID", _S, Patient.patient_id, "text"),
    ("IssuerOfPatientID", _S, Patient.issuer, "text"),
    ("PatientBirthDate", _S, Patient.birth_date, "date"),
    ("PatientSex", _S, Patient.sex, "text"),
    ("StudyInstanceUID", _S, Study.study_instance_uid, "uid"),
    ("StudyDate", _S, Study.study_date, "date"),
    ("StudyTime", _S, Study.study_time, "time"),
    ("AccessionNumber", _S, Study.accession_number, "text"),
    ("StudyID", _S, Study.study_id, "text"),
    ("StudyDescription", _S, Study.description, "text"),
    ("ReferringPhysicianName", _S, Study.referring_physician, "pn"),
    ("SeriesInstanceUID", _SE, Series.series_instance_uid, "uid"),
    ("Modality", _SE, Series.modality, "text"),
    ("SeriesNumber", _SE, Series.series_number, "int"),
    ("BodyPartExamined", _SE, Series.body_part_examined, "text"),
    ("SeriesDescription", _SE, Series.description, "text"),
    ("SOPInstanceUID", _I, Instance.sop_instance_uid, "uid"),
    ("SOPClassUID", _I, Instance.sop_class_uid, "uid"),
    ("InstanceNumber", _I, Instance.instance_number, "int"),
    ("AvailableTransferSyntaxUID", _I, Instance.transfer_syntax_uid, "uid"),
)

#: Return-only keys computed from the lower levels (PS3.4 C.3.4 "Additional Query/Retrieve
#: Attributes"); ModalitiesInStudy is also a matching key (C.6.2.1.2, any value matches).
COMPUTED_KEYS: dict[str, QueryLevel] = {
    "ModalitiesInStudy": _S,
    "SOPClassesInStudy": _S,
    "NumberOfStudyRelatedSeries": _S,
    "NumberOfStudyRelatedInstances": _S,
    "NumberOfSeriesRelatedInstances": _SE,
}

#: Elements that describe the request rather than the data (never matched, never echoed as-is).
_CONTROL_KEYWORDS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"})


@dataclass(frozen=True)
class Condition:
    """A parsed, non-universal matching key."""

    keyword: str
    level: QueryLevel
    clause: ColumnElement[bool]


@dataclass(frozen=True)
class Query:
    """A parsed C-FIND / C-MOVE / C-GET identifier."""

    level: QueryLevel
    conditions: tuple[Condition, ...]
    #: (tag, keyword, VR) of every key the requestor asked about, in identifier order.
    requested: tuple[tuple[int, str, str], ...]
    #: keyword -> the requested value, for the unique keys (used by retrieve validation).
    unique_values: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def asks_for(self, keyword: str) -> bool:
        return any(kw == keyword for _, kw, _ in self.requested)


@dataclass(frozen=True)
class RetrieveMatch:
    """One instance selected by a C-MOVE / C-GET identifier, with what audit needs."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    accession_number: str | None
    patient_id: str
    patient_name: str | None


# -- parsing ------------------------------------------------------------------------------------


def parse_level(identifier: Dataset) -> QueryLevel:
    """Query/Retrieve Level is mandatory in every Q/R identifier (PS3.4 C.4.1.1.3.1)."""
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        return QueryLevel(raw)
    except ValueError:
        raise QueryError(f"QueryRetrieveLevel {raw or '(missing)'} is not supported by the Study Root model") from None


def parse_query(identifier: Dataset) -> Query:
    """Turn *identifier* into a :class:`Query`; raises :class:`QueryError` on values we cannot
    evaluate (a malformed date range, a non-numeric IS, a wildcard in a UID list)."""
    level = parse_level(identifier)
    depth = _DEPTH[level]
    conditions: list[Condition] = []
    requested: list[tuple[int, str, str]] = []
    unique_values: dict[str, tuple[str, ...]] = {}
    for element in identifier:
        if element.tag.group == 0x0002 or element.tag.is_private:
            continue
        keyword = element.keyword or keyword_for_tag(element.tag)
        if keyword in _CONTROL_KEYWORDS:
            continue
        requested.append((int(element.tag), keyword, _response_vr(element)))
        values = _values(element)
        spec = MATCHING_KEYS.get(keyword)
        if spec is not None and _DEPTH[spec.level] <= depth:
            if spec.kind == "uid" and values:
                unique_values[keyword] = values
            clause = _clause(spec, values)
            if clause is not None:
                conditions.append(Condition(keyword, spec.level, clause))
        elif keyword == "ModalitiesInStudy" and depth == 0 and values:
            conditions.append(Condition(keyword, QueryLevel.STUDY, _modalities_clause(values)))
    return Query(level, tuple(conditions), tuple(requested), unique_values)


def _response_vr(element: DataElement) -> str:
    """The VR to answer with: the dictionary's when unambiguous, else what the request carried."""
    try:
        vr = str(dictionary_VR(element.tag))
    except KeyError:
        return str(element.VR)
    return str(element.VR) if " or " in vr else vr


def _values(element: DataElement) -> tuple[str, ...]:
    """The element's values as stripped strings; () means universal matching."""
    value = element.value
    if element.VR == "SQ" or value is None:
        return ()
    items: Iterable[Any] = value if isinstance(value, (MultiValue, list, tuple)) else (value,)
    texts = tuple(str(item).strip() for item in items)
    texts = tuple(text for text in texts if text)
    if texts == ("*",):
        return ()  # C.2.2.2.4: a lone "*" is universal matching
    return texts


def _clause(spec: KeySpec, values: tuple[str, ...]) -> ColumnElement[bool] | None:
    if not values:
        return None
    column = spec.column
    if spec.kind == "uid":
        for uid in values:
            if not is_valid_uid(uid):
                raise QueryError(f"{spec.keyword}: list of UID matching needs UIDs (no wildcards)")
        return column.in_(values) if len(values) > 1 else column == values[0]
    if len(values) > 1:
        raise QueryError(f"{spec.keyword}: multiple values are only allowed for UID lists")
    value = values[0]
    if spec.kind == "date":
        return _range_clause(spec.keyword, column, value, _date_bounds)
    if spec.kind == "time":
        return _range_clause(spec.keyword, column, value, _time_bounds)
    if spec.kind == "int":
        try:
            return column == int(value)
        except ValueError:
            raise QueryError(f"{spec.keyword}: single value matching needs an integer") from None
    return text_match(column, value, case_insensitive=spec.kind == "pn")


def text_match(column: InstrumentedAttribute[Any], value: str, *, case_insensitive: bool) -> ColumnElement[bool]:
    """Single value or wildcard matching of a text attribute (C.2.2.2.1, C.2.2.2.4)."""
    if "*" not in value and "?" not in value and not case_insensitive:
        return column == value
    return column.regexp_match(wildcard_regex(value, case_insensitive=case_insensitive))


def wildcard_regex(value: str, *, case_insensitive: bool) -> str:
    """An anchored regular expression, valid for Python ``re`` and PostgreSQL AREs alike.

    ``*`` -> any run of characters, ``?`` -> one character; every other non-alphanumeric
    character is escaped (``\\`` + character is a literal in both dialects); letters become
    ``[xX]`` classes when matching ignores case, since SQLite's REGEXP takes no flags.
    """
    parts = ["^"]
    for char in value:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char.isalnum():
            lower, upper = char.lower(), char.upper()
            if case_insensitive and lower != upper and len(lower) == len(upper) == 1:
                parts.append(f"[{lower}{upper}]")
            else:
                parts.append(char)
        else:
            parts.append("\\" + char)
    parts.append("$")
    return "".join(parts)


_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def _date_bounds(keyword: str, value: str, upper: bool) -> str:
    compact = value.replace(".", "") if len(value) == 10 else value  # ACR-NEMA "YYYY.MM.DD"
    if not _DATE_RE.match(compact):
        raise QueryError(f"{keyword}: not a DA value or range")
    return compact


def _time_bounds(keyword: str, value: str, upper: bool) -> str:
    """Normalise a TM bound so that string order is time order: "13" as an upper bound means
    up to 13:59:59.999999, as a lower bound from 13:00:00 (PS3.4 C.2.2.2.5.1)."""
    compact = value.replace(":", "")
    if not _TIME_RE.match(compact):
        raise QueryError(f"{keyword}: not a TM value or range")
    whole, _, fraction = compact.partition(".")
    if upper:
        return (whole + "595959"[len(whole) - 2 :] if len(whole) < 6 else whole) + "." + (fraction + "999999")[:6]
    return whole.ljust(6, "0") + ("." + fraction if fraction else "")


def _range_clause(
    keyword: str, column: InstrumentedAttribute[Any], value: str, bounds: Callable[[str, str, bool], str]
) -> ColumnElement[bool]:
    if "-" not in value:
        if bounds is _time_bounds:  # a single time is the range it spans at its precision
            return and_(column >= bounds(keyword, value, False), column <= bounds(keyword, value, True))
        return column == bounds(keyword, value, False)
    if value.count("-") != 1:
        raise QueryError(f"{keyword}: a range has exactly one '-'")
    low, high = (part.strip() for part in value.split("-"))
    if not low and not high:
        return true()
    clauses = []
    if low:
        clauses.append(column >= bounds(keyword, low, False))
    if high:
        clauses.append(column <= bounds(keyword, high, True))
    return and_(column.is_not(None), *clauses)


def _modalities_clause(values: Sequence[str]) -> ColumnElement[bool]:
    """ModalitiesInStudy matches a study when any of its series' modalities matches any of the
    requested values (PS3.4 C.6.2.1.2: multi-valued matching)."""
    per_value = [text_match(Series.modality, value, case_insensitive=False) for value in values]
    return exists().where(Series.study_pk == Study.id, or_(*per_value) if per_value else false())


# -- C-FIND -------------------------------------------------------------------------------------


def build_select(query: Query, *, granularity: QueryLevel | None = None) -> Select[Any]:
    """The SELECT of the entities at *granularity* (default: the query level) that match.

    Rows are (Study, Patient[, Series[, Instance]]) ordered by primary keys so that results
    come back in a stable order (arrival order, in practice).
    """
    depth = _DEPTH[granularity or query.level]
    entities: list[Any] = [Study, Patient]
    order: list[Any] = [Study.id]
    if depth >= 1:
        entities.append(Series)
        order.append(Series.id)
    if depth >= 2:
        entities.append(Instance)
        order.append(Instance.id)
    statement = select(*entities).join(Patient, Study.patient_pk == Patient.id)
    if depth >= 1:
        statement = statement.join(Series, Series.study_pk == Study.id)
    if depth >= 2:
        statement = statement.join(Instance, Instance.series_pk == Series.id)
    clauses = [condition.clause for condition in query.conditions]
    if clauses:
        statement = statement.where(*clauses)
    return statement.order_by(*order)


def find(session: Session, identifier: Dataset, *, retrieve_ae_title: str, batch: int = 500) -> Iterator[Dataset]:
    """Evaluate a C-FIND identifier; yields one response identifier per match (C.4.1.2.2).

    Parsing errors surface on the first ``next()``; callers that must fail before answering
    Pending call :func:`parse_query` first.
    """
    query = parse_query(identifier)
    rows = session.execute(build_select(query)).all()
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        computed = _computed_values(session, query, chunk)
        for row in chunk:
            yield build_response(query, row, computed, retrieve_ae_title=retrieve_ae_title)


def _computed_values(session: Session, query: Query, rows: Sequence[Any]) -> dict[str, dict[int, Any]]:
    """Aggregates the requestor asked for, for a batch of rows, in one statement per key."""
    out: dict[str, dict[int, Any]] = {}
    study_pks = sorted({row[0].id for row in rows})
    if query.level is QueryLevel.STUDY and study_pks:
        if query.asks_for("NumberOfStudyRelatedSeries"):
            counted = session.execute(
                select(Series.study_pk, func.count(Series.id)).where(Series.study_pk.in_(study_pks)).group_by(Series.study_pk)
            ).all()
            out["NumberOfStudyRelatedSeries"] = {pk: n for pk, n in counted}
        if query.asks_for("NumberOfStudyRelatedInstances"):
            counted = session.execute(
                select(Series.study_pk, func.count(Instance.id))
                .join(Instance, Instance.series_pk == Series.id)
                .where(Series.study_pk.in_(study_pks))
                .group_by(Series.study_pk)
            ).all()
            out["NumberOfStudyRelatedInstances"] = {pk: n for pk, n in counted}
        if query.asks_for("ModalitiesInStudy"):
            out["ModalitiesInStudy"] = _distinct_by(
                session, select(Series.study_pk, Series.modality).where(Series.study_pk.in_(study_pks)).distinct()
            )
        if query.asks_for("SOPClassesInStudy"):
            out["SOPClassesInStudy"] = _distinct_by(
                session,
                select(Series.study_pk, Instance.sop_class_uid)
                .join(Instance, Instance.series_pk == Series.id)
                .where(Series.study_pk.in_(study_pks))
                .distinct(),
            )
    if query.level is QueryLevel.SERIES and query.asks_for("NumberOfSeriesRelatedInstances") and rows:
        series_pks = sorted({row[2].id for row in rows})
        counted = session.execute(
            select(Instance.series_pk, func.count(Instance.id))
            .where(Instance.series_pk.in_(series_pks))
            .group_by(Instance.series_pk)
        ).all()
        out["NumberOfSeriesRelatedInstances"] = {pk: n for pk, n in counted}
    return out


def _distinct_by(session: Session, statement: Executable) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = defaultdict(list)
    for pk, value in session.execute(statement).all():
        if value:
            grouped[pk].append(value)
    return {pk: sorted(values) for pk, values in grouped.items()}


def build_response(
    query: Query, row: Sequence[Any], computed: dict[str, dict[int, Any]], *, retrieve_ae_title: str
) -> Dataset:
    """One C-FIND response identifier: every requested key, filled when we hold it, zero-length
    when we do not or when it belongs to a lower level (C.4.1.1.3.2)."""
    entities: dict[Any, Any] = {type(entity): entity for entity in row}
    response = Dataset()
    response.QueryRetrieveLevel = query.level.value
    response.RetrieveAETitle = retrieve_ae_title
    non_ascii = False
    for tag, keyword, vr in query.requested:
        value = _response_value(keyword, query.level, entities, computed)
        if vr == "SQ":
            response.add_new(tag, vr, [])
            continue
        if isinstance(value, str) and not value.isascii():
            non_ascii = True
        if isinstance(value, list) and any(not item.isascii() for item in value):
            non_ascii = True
        response.add_new(tag, vr, value)
    if non_ascii:
        response.SpecificCharacterSet = UTF8
    return response


def _response_value(
    keyword: str, level: QueryLevel, entities: dict[Any, Any], computed: dict[str, dict[int, Any]]
) -> Any:
    spec = MATCHING_KEYS.get(keyword)
    if spec is not None:
        if _DEPTH[spec.level] > _DEPTH[level]:
            return None
        model = spec.column.class_
        entity = entities.get(model)
        return None if entity is None else getattr(entity, spec.column.key)
    computed_level = COMPUTED_KEYS.get(keyword)
    if computed_level is None or computed_level is not level or keyword not in computed:
        return None
    owner = entities[Study] if computed_level is QueryLevel.STUDY else entities[Series]
    default: Any = [] if keyword in ("ModalitiesInStudy", "SOPClassesInStudy") else 0
    return computed[keyword].get(owner.id, default)


# -- C-MOVE / C-GET -----------------------------------------------------------------------------


def parse_retrieve(identifier: Dataset) -> Query:
    """Parse a C-MOVE/C-GET identifier: it must name the unique key of its level (PS3.4
    C.4.2.2.1 / C.4.3.2.1), or an empty identifier would retrieve the whole archive."""
    query = parse_query(identifier)
    unique = UNIQUE_KEYS[query.level]
    if unique not in query.unique_values:
        raise QueryError(f"a {query.level.value} level retrieve needs {unique} (single value or list)")
    return query


def retrieve_matches(session: Session, identifier: Dataset) -> list[RetrieveMatch]:
    """Every stored instance selected by a C-MOVE / C-GET identifier, in a stable order."""
    return instances_matching(session, parse_retrieve(identifier))


def instances_matching(session: Session, query: Query) -> list[RetrieveMatch]:
    """Every stored instance a parsed (Study or Patient Root) query selects, in a stable order."""
    rows = session.execute(build_select(query, granularity=QueryLevel.IMAGE)).all()
    return [
        RetrieveMatch(
            path=instance.path,
            sop_class_uid=instance.sop_class_uid,
            sop_instance_uid=instance.sop_instance_uid,
            transfer_syntax_uid=instance.transfer_syntax_uid,
            study_instance_uid=study.study_instance_uid,
            accession_number=study.accession_number,
            patient_id=patient.patient_id,
            patient_name=patient.name,
        )
        for study, patient, _series, instance in rows
    ]


def supported_keywords() -> tuple[str, ...]:
    """Every key we match or compute (for the conformance statement and tests)."""
    return (*MATCHING_KEYS, *COMPUTED_KEYS)
