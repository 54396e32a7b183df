"""``GET /fhir/AuditEvent/{id}`` and ``GET /fhir/AuditEvent?...``: the audit log as FHIR R4 AuditEvent.

Each record of the hash-chained log is one AuditEvent (IHE BALP shape, :mod:`audit.fhir_audit_event`),
its id the record's sequence number. Search parameters: :mod:`fhir_api.audit_event_search`.

**Scope.** Reading the audit log needs a scope that names AuditEvent: ``system/AuditEvent.rs``
(or ``.read``, ``.r``, ``.s``). ``system/*.rs`` does not grant it (:data:`fhir_api.auth.EXPLICIT_SCOPE_TYPES`):
SMART App Launch 2.x lets a server grant less than a token's scopes, and a clinical client given
"read everything" should not learn who else read which patient's records (the HIPAA minimum
necessary standard, §164.502(b)). Anonymous development mode holds ``system/*.rs`` only, so it
never reads the audit log either.

**Reading the log is audited**: every read and search appends a PS3.15 A.5.3.3 "Audit Log Used"
record (who, from where, the query) through the same batched :class:`~fhir_api.audit_trail.AuditTrail`
as other FHIR access; refusals (401, 403) are audited like every other FHIR refusal.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from urllib.parse import urlencode

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.exc import IntegrityError

from audit.export import audit_log_used
from audit.fhir_audit_event import to_fhir
from audit.search_index import CATCH_UP_PER_SEARCH, behind, catch_up, get, indexed_up_to, search
from conf.errors import NotFoundError, UnavailableError
from fhir_api.api import FhirApi, _fhir_response, check_format
from fhir_api.audit_event_search import PatientReferences, parse_audit_search
from fhir_api.resources import operation_outcome
from fhir_api.store import instant
from storage.models import utcnow

log = structlog.get_logger(__name__)

RESOURCE = "AuditEvent"
_MAX_SEQ = 2**63 - 1


def _catch_up(api: FhirApi) -> int:
    """Index the records appended since the last search (:func:`audit.search_index.catch_up`) and
    return the newest record indexed: the search sees the log up to it, so that every parameter
    sees the same records. 503 while the index is still far behind (after upgrading a large log)."""
    indexed = 0
    try:
        with api.db.session() as session:
            indexed = catch_up(session, limit=CATCH_UP_PER_SEARCH)
    except IntegrityError:
        pass  # another request indexed the same records first: they are indexed
    with api.db.read_session() as session:
        if indexed >= CATCH_UP_PER_SEARCH and behind(session):
            log.warning("fhir.audit_index_behind", indexed=indexed)
            raise UnavailableError("the audit log's search index is being built (after an upgrade); retry shortly")
        return indexed_up_to(session)


def build_audit_router(api: FhirApi) -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["FHIR R4"])

    def _client(request: Request) -> str | None:
        return request.client.host if request.client else None

    @router.get(f"/{RESOURCE}", summary="search the audit log (AuditEvent)")
    def search_audit(request: Request) -> Response:
        pretty = check_format(request)
        principal = api.principal(request, RESOURCE, "search")
        params = list(request.query_params.multi_items())
        strict = "handling=strict" in request.headers.get("prefer", "").replace(" ", "").lower()
        up_to = _catch_up(api)
        base = api.base_url(request)
        with api.db.read_session() as session:
            parsed = parse_audit_search(session, params, strict=strict, default_count=api.settings.default_count,
                                        max_count=api.settings.max_count)
            query = dataclasses.replace(parsed.query, up_to_seq=up_to)
            records, more = search(session, query) if query.count > 0 else ([], False)
            patients = PatientReferences(session)
            entries = [{"fullUrl": f"{base}/{RESOURCE}/{r.seq}",
                        "resource": to_fhir(r.seq, r.recorded_at, r.event, patient_reference=patients),
                        "search": {"mode": "match"}} for r in records]
        given = [(k, v) for k, v in params if k not in ("_cursor", "_format", "_pretty")]
        links = [{"relation": "self", "url": f"{base}/{RESOURCE}" + (f"?{urlencode(given)}" if given else "")}]
        if more and records:
            links.append({"relation": "next", "url": f"{base}/{RESOURCE}?" + urlencode([*given, ("_cursor", records[-1].seq)])})
        if parsed.warnings:
            entries.append({"resource": operation_outcome([("warning", "not-supported", w) for w in parsed.warnings]),
                            "search": {"mode": "outcome"}})
        api.trail.record(audit_log_used(
            api.audit_source, user=principal.client_id, host=_client(request), when=utcnow(),
            description=f"FHIR AuditEvent search: {len(records)} records returned", query=urlencode(params),
        ))
        bundle = {"resourceType": "Bundle", "type": "searchset", "meta": {"lastUpdated": instant(utcnow())},
                  "link": links, "entry": entries}
        if not entries:
            del bundle["entry"]
        return _fhir_response(json.dumps(bundle, ensure_ascii=False), pretty=pretty)

    @router.get(f"/{RESOURCE}/{{logical_id}}", summary="read one audit record (AuditEvent)")
    def read_audit(request: Request, logical_id: str) -> Response:
        pretty = check_format(request)
        principal = api.principal(request, RESOURCE, "read")
        if not (logical_id.isascii() and logical_id.isdigit() and len(logical_id) <= 19) or int(logical_id) > _MAX_SEQ:
            raise NotFoundError(f"{RESOURCE}/{logical_id[:80]!r} is not known (audit record ids are sequence numbers)")
        with api.db.read_session() as session:
            record = get(session, int(logical_id))
            resource = None if record is None else to_fhir(
                record.seq, record.recorded_at, record.event, patient_reference=PatientReferences(session))
        if record is None or resource is None:
            raise NotFoundError(f"{RESOURCE}/{logical_id} is not known")
        api.trail.record(audit_log_used(
            api.audit_source, user=principal.client_id, host=_client(request), when=utcnow(),
            description=f"FHIR AuditEvent read: record {record.seq}",
        ))
        headers = {"ETag": 'W/"1"', "Content-Location": f"{api.base_url(request)}/{RESOURCE}/{record.seq}/_history/1",
                   "Last-Modified": record.recorded_at.astimezone(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")}
        return _fhir_response(json.dumps(resource, ensure_ascii=False), pretty=pretty, headers=headers)

    return router
