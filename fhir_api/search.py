"""Running a FHIR search over the projection: matches, paging, includes (FHIR R4 Search §3.1.1).

Paging is stable while new reports arrive: the first page fixes a snapshot (the highest
``fhir_resource.id`` at that moment; ids grow with each new logical resource) and every later
page of the same search sees only resources up to it, in the same order (the requested sort,
then ``id``). The snapshot, the offset and the first page's ``total`` travel in the opaque
``_cursor`` of the ``next`` link; the other parameters are repeated as they were given, so the
link is a complete, bookmarkable search.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from conf.errors import InvalidInputError
from fhir_api.search_params import Include, SearchRequest, filter_clause, sort_columns
from fhir_api.store import StoredResource
from storage.models import FhirResource, FhirSearchIndex

#: Bound of every cursor number: fhir_resource.id is INTEGER (int4 on PostgreSQL), Bundle.total an unsignedInt.
_MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class Cursor:
    """Where a search's next page starts: the snapshot, the offset and the total of page one."""

    as_of: int
    offset: int
    total: int | None

    def encode(self) -> str:
        raw = json.dumps([self.as_of, self.offset, self.total], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            as_of, offset, total = json.loads(raw)
            if not all(type(n) is int and 0 <= n <= _MAX_INT for n in (as_of, offset)):
                raise ValueError("bad cursor fields")
            if total is not None and not (type(total) is int and 0 <= total <= _MAX_INT):
                raise ValueError("bad cursor total")
        except (ValueError, TypeError, binascii.Error) as exc:
            raise InvalidInputError("_cursor: not a cursor of this server (follow the Bundle's next link as given)") from exc
        return cls(as_of, offset, total)


@dataclass(frozen=True)
class SearchResult:
    """One page: the matches (in order), what they include, the total and where the next page starts."""

    matches: list[StoredResource]
    included: list[StoredResource]
    total: int | None
    next_cursor: Cursor | None


def _row(row: FhirResource) -> StoredResource:
    return StoredResource(row.id, row.resource_type, row.logical_id, row.version_id, row.last_updated, row.content)


def _conditions(resource_type: str, request: SearchRequest, as_of: int) -> list[ColumnElement[bool]]:
    return [
        FhirResource.resource_type == resource_type,
        FhirResource.version_id > 0,
        FhirResource.id <= as_of,
        *(filter_clause(resource_type, f) for f in request.filters),
    ]


#: Without ``_total=accurate``, a search counts its matches only up to this many: above it the
#: Bundle has no ``total`` (R4 Bundle.total is optional; the ``next`` links still page through all).
#: Counting every match of a broad search (``date=ge2020``) costs the database more than the page.
TOTAL_COUNT_LIMIT = 1000


def count(session: Session, resource_type: str, request: SearchRequest) -> int:
    """``_summary=count``: how many resources match, no entries (always exact)."""
    as_of = _snapshot(session)
    return int(session.execute(select(func.count()).where(*_conditions(resource_type, request, as_of))).scalar_one())


def _total(session: Session, conditions: list[ColumnElement[bool]], *, accurate: bool) -> int | None:
    """The number of matches: exact when ``accurate`` or when there are at most :data:`TOTAL_COUNT_LIMIT`."""
    if accurate:
        return int(session.execute(select(func.count()).where(*conditions)).scalar_one())
    bounded = select(FhirResource.id).where(*conditions).limit(TOTAL_COUNT_LIMIT + 1).subquery()
    found = int(session.execute(select(func.count()).select_from(bounded)).scalar_one())
    return found if found <= TOTAL_COUNT_LIMIT else None


def _snapshot(session: Session) -> int:
    return int(session.execute(select(func.coalesce(func.max(FhirResource.id), 0))).scalar_one())


def run(session: Session, resource_type: str, request: SearchRequest, *, with_total: bool = True) -> SearchResult:
    """One page of the search *request* over *resource_type* (see the module docstring).

    ``total``: ``_total=none`` (``with_total`` False) none; ``_total=accurate`` always exact; by
    default exact up to :data:`TOTAL_COUNT_LIMIT` matches and absent above. Page one computes it,
    later pages carry it in the cursor."""
    cursor = Cursor.decode(request.cursor) if request.cursor else None
    as_of = cursor.as_of if cursor else _snapshot(session)
    offset = cursor.offset if cursor else 0
    conditions = _conditions(resource_type, request, as_of)
    total = cursor.total if cursor else None
    if cursor is None and with_total:
        total = _total(session, conditions, accurate=request.total == "accurate")
    # Resources without the sorted value come last either way, on SQLite and PostgreSQL alike.
    order = [(column.desc() if descending else column.asc()).nulls_last()
             for column, descending in sort_columns(resource_type, request.sort)]
    # Without _sort: newest first (by creation), what an EHR polling for recent reports wants, and
    # the order in which a recent-date search finds its matches at once.
    tiebreak = FhirResource.id.asc() if request.sort else FhirResource.id.desc()
    rows = session.execute(
        select(FhirResource).where(*conditions).order_by(*order, tiebreak).offset(offset).limit(request.count + 1)
    ).scalars().all()
    matches = [_row(r) for r in rows[: request.count]]
    more = len(rows) > request.count
    next_cursor = Cursor(as_of, offset + request.count, total) if more else None
    included = _included(session, matches, request.includes, request.revincludes)
    return SearchResult(matches, included, total, next_cursor)


def _included(
    session: Session, matches: Sequence[StoredResource], includes: Sequence[Include], revincludes: Sequence[Include]
) -> list[StoredResource]:
    """``_include`` targets and ``_revinclude`` sources of the page's matches, each once, none a match."""
    if not matches or not (includes or revincludes):
        return []
    seen = {(m.resource_type, m.logical_id) for m in matches}
    found: list[StoredResource] = []

    def add(rows: Sequence[FhirResource]) -> None:
        for row in rows:
            key = (row.resource_type, row.logical_id)
            if key not in seen:
                seen.add(key)
                found.append(_row(row))

    pks = [m.pk for m in matches]
    for include in includes:
        refs = session.execute(
            select(FhirSearchIndex.value).where(
                FhirSearchIndex.resource_pk.in_(pks), FhirSearchIndex.param == include.param,
                FhirSearchIndex.resource_type == include.source_type,
            )
        ).scalars().all()
        targets: dict[str, set[str]] = {}
        for ref in refs:
            if ref and "/" in ref:
                target_type, _, target_id = ref.partition("/")
                if include.target_type is None or include.target_type == target_type:
                    targets.setdefault(target_type, set()).add(target_id)
        for target_type, ids in sorted(targets.items()):
            add(session.execute(
                select(FhirResource).where(
                    FhirResource.resource_type == target_type, FhirResource.logical_id.in_(sorted(ids)),
                    FhirResource.version_id > 0,
                ).order_by(FhirResource.id)
            ).scalars().all())
    for revinclude in revincludes:
        refs_of_matches = [f"{m.resource_type}/{m.logical_id}" for m in matches
                           if revinclude.target_type in (None, m.resource_type)]
        if not refs_of_matches:
            continue
        add(session.execute(
            select(FhirResource)
            .join(FhirSearchIndex, FhirSearchIndex.resource_pk == FhirResource.id)
            .where(
                FhirResource.resource_type == revinclude.source_type, FhirResource.version_id > 0,
                FhirSearchIndex.resource_type == revinclude.source_type, FhirSearchIndex.param == revinclude.param,
                FhirSearchIndex.value.in_(refs_of_matches),
            )
            .order_by(FhirResource.id)
            .distinct()
        ).scalars().all())
    return found
