"""The FHIR R4 REST API under ``/fhir`` (docs/fhir.md): thin HTTP adapters over the projection.

Each route authenticates (:mod:`fhir_api.auth`), checks the SMART scope for its interaction,
calls one function (:mod:`fhir_api.store`, :mod:`fhir_api.search`, :mod:`fhir_api.subscriptions`),
writes the response and queues the audit record (:mod:`fhir_api.audit_trail`). Errors are raised
as the project's exception kinds and become OperationOutcomes in :func:`install` (one table).

Responses are ``application/fhir+json``: resources are served as stored (pre-serialised JSON,
``meta.versionId``/``lastUpdated`` included), Bundles are assembled around them without parsing
them again. XML is not supported: ``_format=xml`` (or an Accept header that allows only XML)
is 406.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from audit.alert_throttle import AlertThrottle
from audit.builders import security_alert
from audit.events import AuditSource, EventType, Outcome
from conf.errors import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotAcceptableError,
    NotFoundError,
    PermissionDeniedError,
    PneumoError,
    UnavailableError,
)
from conf.settings import FhirSettings
from fhir_api import search, store, subscriptions
from fhir_api.audit_trail import AuditTrail, fhir_access_event, refused_access_event
from fhir_api.auth import Interaction, Principal, TokenVerifier, smart_configuration
from fhir_api.capability import capability_statement
from fhir_api.limits import (
    BODY_TOO_LARGE,
    RATE_LIMITED,
    BodyLimit,
    PayloadTooLargeError,
    RateLimiter,
    TooManyRequestsError,
    retry_after_seconds,
)
from fhir_api.resources import operation_outcome
from fhir_api.search_params import SEARCH_PARAMS, parse_search
from fhir_api.store import StoredResource, instant
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Instance, InstanceOrigin, utcnow

log = structlog.get_logger(__name__)

FHIR_JSON = "application/fhir+json"
_JSON_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}
_XML_FORMATS = {"xml", "text/xml", "application/xml", "application/fhir+xml", "application/xml+fhir"}
#: Parameters about the response, not the search (FHIR R4 http §3.1.0.1.10, §3.1.0.1.11).
_RESPONSE_PARAMS = {"_format", "_pretty"}
#: Types that clients may write (everything else is a read-only projection).
WRITABLE = {"Subscription"}


class MethodNotAllowedError(PneumoError):
    """The resource type does not support this interaction (405)."""


class UnsupportedMediaTypeError(PneumoError):
    """The request body is not FHIR JSON (415)."""


#: One table: the exception kind -> HTTP status and FHIR issue type (R4 valueset issue-type).
_ERROR_TABLE: tuple[tuple[type[Exception], int, str], ...] = (
    (AuthenticationError, 401, "login"),
    (PermissionDeniedError, 403, "forbidden"),
    (NotFoundError, 404, "not-found"),
    (MethodNotAllowedError, 405, "not-supported"),
    (NotAcceptableError, 406, "not-supported"),
    (ConflictError, 409, "conflict"),
    (UnsupportedMediaTypeError, 415, "not-supported"),
    (InvalidInputError, 400, "invalid"),
    (UnavailableError, 503, "transient"),
)


def outcome_response(status: int, code: str, diagnostics: str, *, headers: Mapping[str, str] | None = None) -> Response:
    body = operation_outcome([("fatal" if status >= 500 else "error", code, diagnostics)])
    return Response(json.dumps(body), status_code=status, media_type=FHIR_JSON, headers=dict(headers or {}))


@dataclass
class _Access:
    """What one request did, for its audit record."""

    interaction: Interaction
    resource_type: str
    returned: list[StoredResource] = field(default_factory=list)
    query: str | None = None


class FhirApi:
    """The routes' shared state: database, verifier, audit trail, settings."""

    def __init__(
        self, database: Database, store_files: FileStore, verifier: TokenVerifier, trail: AuditTrail,
        audit_source: AuditSource, settings: FhirSettings, *, software_version: str,
        subscription_endpoints: Sequence[str] = (),
    ) -> None:
        self.db = database
        self.files = store_files
        self.verifier = verifier
        self.trail = trail
        self.audit_source = audit_source
        self.settings = settings
        self.software_version = software_version
        self.subscription_endpoints = tuple(subscription_endpoints)
        self.rate = RateLimiter(settings.requests_per_second, settings.request_burst)
        self.alerts = AlertThrottle()

    # -- plumbing ----------------------------------------------------------------------------

    def base_url(self, request: Request) -> str:
        if self.settings.base_url:
            return self.settings.base_url.rstrip("/")
        return str(request.base_url).rstrip("/") + "/fhir"

    def principal(self, request: Request, resource_type: str, interaction: Interaction) -> Principal:
        """The verified caller, charged one request of its rate (fhir_api.limits): by client id, by
        address when anonymous or when its token is refused (a bad-token flood is throttled too)."""
        address = request.client.host if request.client else None
        try:
            principal = self.verifier.verify(request.headers.get("authorization"))
        except AuthenticationError:
            self._charge(f"address {address or 'unknown'}", address)
            raise
        self._charge(f"address {address or 'unknown'}" if principal.anonymous else principal.client_id, address)
        principal.require(resource_type, interaction)
        return principal

    def _charge(self, client: str, address: str | None) -> None:
        wait = self.rate.take(client)
        if wait > 0:
            self.limit_breached(client, address, RATE_LIMITED,
                                f"more than {self.rate.rate:g} requests/s (burst {self.rate.burst:g})")
            raise TooManyRequestsError(
                f"request rate exceeded ({self.rate.rate:g}/s); retry later", retry_after=retry_after_seconds(wait))

    def limit_breached(self, client: str, address: str | None, kind: str, what: str) -> None:
        """A request refused by a limit: a throttled Security Alert (PS3.15 A.5.3.11, Use of
        Restricted Function) and WARN line; the refusal itself is always answered."""
        breach = self.alerts.breach(client, kind)
        if breach is None:
            return
        description = breach.describe(f"FHIR {kind} limit: {what}")
        log.warning("fhir.limit_exceeded", client=client, address=address, limit=kind, refused=breach.count)
        self.trail.record(security_alert(
            self.audit_source, event_type=EventType.USE_OF_RESTRICTED_FUNCTION, reporter_ae=self.audit_source.source_id,
            offender_id=client, offender_host=address, description=description, when=utcnow(),
        ))

    def audit(self, request: Request, principal: Principal, access: _Access, outcome: Outcome = Outcome.SUCCESS) -> None:
        patients: set[str] = set()
        for resource in access.returned:
            patients.update(_patients_of(resource))
        self.trail.record(
            fhir_access_event(
                self.audit_source,
                client_id=principal.client_id,
                client_address=request.client.host if request.client else None,
                interaction=access.interaction,
                resource_type=access.resource_type,
                returned=[f"{r.resource_type}/{r.logical_id}/_history/{r.version_id}" for r in access.returned],
                patients=patients,
                query=access.query,
                outcome=outcome,
                when=utcnow(),
            )
        )


def _patients_of(resource: StoredResource) -> Iterable[str]:
    """The FHIR Patient references a resource is about (for the audit record)."""
    if resource.resource_type == "Patient":
        return [f"Patient/{resource.logical_id}"]
    body = resource.json()
    refs = [body.get("subject", {}).get("reference"), body.get("patient", {}).get("reference")]
    return [r for r in refs if isinstance(r, str) and r.startswith("Patient/")]


def check_format(request: Request) -> bool:
    """Whether the client asked for pretty output; raises 406 when it asked for anything but JSON."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        base = fmt.split(";")[0].strip().lower()
        if base in _XML_FORMATS or base not in _JSON_FORMATS:
            raise NotAcceptableError(f"_format={fmt}: this server speaks FHIR JSON only (application/fhir+json)")
    else:
        accept = request.headers.get("accept", "")
        types = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
        if types and all(t in _XML_FORMATS for t in types):
            raise NotAcceptableError("Accept: this server speaks FHIR JSON only (application/fhir+json)")
    return request.query_params.get("_pretty", "false").lower() == "true"


def _fhir_response(content: str, *, pretty: bool, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    if pretty:
        content = json.dumps(json.loads(content), indent=2, ensure_ascii=False)
    return Response(content.encode("utf-8"), status_code=status, media_type=FHIR_JSON, headers=dict(headers or {}))


def _resource_headers(resource: StoredResource, base: str) -> dict[str, str]:
    last_modified = resource.last_updated.astimezone(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    return {
        "ETag": resource.etag,
        "Last-Modified": last_modified,
        "Content-Location": f"{base}/{resource.resource_type}/{resource.logical_id}/_history/{resource.version_id}",
    }


def _not_modified(request: Request, resource: StoredResource) -> bool:
    """If-None-Match (FHIR R4 http §3.1.0.8.1): the client's copy is current."""
    tags = [t.strip() for t in request.headers.get("if-none-match", "").split(",") if t.strip()]
    plain = resource.etag[2:]
    return any(t in (resource.etag, plain, "*") for t in tags)


def _known_type(resource_type: str) -> None:
    if resource_type not in SEARCH_PARAMS:
        raise NotFoundError(f"resource type {resource_type!r} is not supported by this server (see /fhir/metadata)")


#: R4 datatypes, id: [A-Za-z0-9\-\.]{1,64}. Nothing else can name a resource we hold.
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _known_id(resource_type: str, logical_id: str) -> None:
    if not _FHIR_ID.fullmatch(logical_id):
        raise NotFoundError(f"{resource_type}/{logical_id[:80]!r} is not known (not a FHIR id)")


def _bundle(
    bundle_type: str, base: str, *, total: int | None, links: Sequence[tuple[str, str]],
    entries: Sequence[tuple[StoredResource, str | None, str]], outcome: Mapping[str, Any] | None = None,
) -> str:
    """A Bundle around pre-serialised resources; *entries* are (resource, search mode or None, content)."""
    head: dict[str, Any] = {
        "resourceType": "Bundle", "id": uuid.uuid4().hex, "meta": {"lastUpdated": instant(utcnow())}, "type": bundle_type,
    }
    if total is not None:
        head["total"] = total
    if links:
        head["link"] = [{"relation": rel, "url": url} for rel, url in links]
    parts: list[str] = []
    for resource, mode, content in entries:
        full_url = f"{base}/{resource.resource_type}/{resource.logical_id}"
        tail = f',"search":{{"mode":"{mode}"}}' if mode else ""
        if bundle_type == "history":  # bdl-3: history entries say what happened (R4 http §3.1.0.9)
            first = resource.version_id == 1
            tail = "," + json.dumps({
                "request": {"method": "POST" if first else "PUT",
                            "url": resource.resource_type if first else f"{resource.resource_type}/{resource.logical_id}"},
                "response": {"status": "201 Created" if first else "200 OK", "etag": resource.etag,
                             "lastModified": instant(resource.last_updated)},
            }, separators=(",", ":"))[1:-1]
        parts.append(f'{{"fullUrl":{json.dumps(full_url)},"resource":{content}{tail}}}')
    if outcome is not None:
        parts.append(f'{{"resource":{json.dumps(outcome)},"search":{{"mode":"outcome"}}}}')
    head_json = json.dumps(head, separators=(",", ":"))
    if not parts:
        return head_json
    return head_json[:-1] + ',"entry":[' + ",".join(parts) + "]}"


def _elements(resource: StoredResource, elements: Sequence[str]) -> str:
    """``_elements`` (FHIR R4 search §3.1.1.5.9): the listed top-level elements plus the mandatory
    ones, tagged SUBSETTED so that nobody mistakes the subset for the resource."""
    body = resource.json()
    keep = {"resourceType", "id", "meta", *elements}
    subset = {k: v for k, v in body.items() if k in keep}
    meta = dict(subset.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                                           "code": "SUBSETTED"}]
    subset["meta"] = meta
    return json.dumps(subset, separators=(",", ":"), ensure_ascii=False)


def build_router(api: FhirApi) -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["FHIR R4"])

    @router.get("/metadata", summary="CapabilityStatement (public)")
    def metadata(request: Request) -> Response:
        pretty = check_format(request)
        statement = capability_statement(api.base_url(request), software_version=api.software_version,
                                         writable=sorted(WRITABLE), max_count=api.settings.max_count)
        return _fhir_response(json.dumps(statement), pretty=pretty)

    @router.get("/.well-known/smart-configuration", summary="SMART configuration (public)")
    def smart(request: Request) -> Response:
        return Response(json.dumps(smart_configuration(api.settings.auth)), media_type="application/json")

    @router.get("/Binary/{logical_id}", summary="Our DICOM SR, as cited by DiagnosticReport.presentedForm")
    def binary(request: Request, logical_id: str) -> Response:
        principal = api.principal(request, "Binary", "read")
        _known_id("Binary", logical_id)
        with api.db.read_session() as session:
            instance = session.execute(
                select(Instance).where(Instance.sop_instance_uid == logical_id, Instance.origin == InstanceOrigin.GENERATED)
            ).scalar_one_or_none()
            relative = None if instance is None else instance.path
        try:
            # authenticated and decrypted by the store (StoredFileIntegrityError -> 500, never bytes)
            data = None if relative is None else api.files.read_bytes(relative)
        except FileNotFoundError:
            data = None
        if data is None:
            raise NotFoundError(f"Binary/{logical_id} is not known")
        api.audit(request, principal, _Access("read", "Binary", [
            StoredResource(0, "Binary", logical_id, 1, utcnow(), "{}")]))
        accept = request.headers.get("accept", "")
        if FHIR_JSON in accept or request.query_params.get("_format") in _JSON_FORMATS:
            body = {"resourceType": "Binary", "id": logical_id, "contentType": "application/dicom",
                    "data": base64.b64encode(data).decode("ascii")}
            return Response(json.dumps(body), media_type=FHIR_JSON)
        return Response(data, media_type="application/dicom")

    @router.get("/{resource_type}", summary="search (GET)")
    def search_get(request: Request, resource_type: str) -> Response:
        return _search(request, resource_type, list(request.query_params.multi_items()))

    @router.post("/{resource_type}/_search", summary="search (POST, form-encoded)")
    async def search_post(request: Request, resource_type: str) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await request.body()
        if body and content_type not in ("application/x-www-form-urlencoded", ""):
            raise UnsupportedMediaTypeError("POST _search takes application/x-www-form-urlencoded parameters")
        params = list(request.query_params.multi_items())
        try:
            params += parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError as exc:
            raise InvalidInputError("the form body is not UTF-8") from exc
        return await run_in_threadpool(_search, request, resource_type, params)

    def _search(request: Request, resource_type: str, params: list[tuple[str, str]]) -> Response:
        pretty = check_format(request)
        _known_type(resource_type)
        principal = api.principal(request, resource_type, "search")
        strict = "handling=strict" in request.headers.get("prefer", "").replace(" ", "").lower()
        search_params = [(k, v) for k, v in params if k not in _RESPONSE_PARAMS]
        parsed = parse_search(resource_type, search_params, strict=strict, default_count=api.settings.default_count,
                              max_count=api.settings.max_count)
        base = api.base_url(request)
        given = [(k, v) for k, v in search_params if k != "_cursor"]
        self_url = f"{base}/{resource_type}" + (f"?{urlencode(given)}" if given else "")
        warnings = operation_outcome([("warning", "not-supported", w) for w in parsed.warnings]) if parsed.warnings else None
        access = _Access("search", resource_type, query=urlencode(search_params))
        if parsed.summary == "count" or parsed.count == 0:
            with api.db.read_session() as session:
                total = search.count(session, resource_type, parsed)
            api.audit(request, principal, access)
            return _fhir_response(_bundle("searchset", base, total=total, links=[("self", self_url)], entries=[],
                                          outcome=warnings), pretty=pretty)
        with api.db.read_session() as session:
            result = search.run(session, resource_type, parsed, with_total=parsed.total != "none")
        links = [("self", self_url)]
        if result.next_cursor is not None:
            links.append(("next", f"{base}/{resource_type}?" + urlencode([*given, ("_cursor", result.next_cursor.encode())])))
        entries: list[tuple[StoredResource, str | None, str]] = [
            (r, "match", _elements(r, parsed.elements) if parsed.elements else r.content) for r in result.matches
        ]
        entries += [(r, "include", r.content) for r in result.included]
        access.returned = [*result.matches, *result.included]
        api.audit(request, principal, access)
        return _fhir_response(_bundle("searchset", base, total=result.total, links=links, entries=entries,
                                      outcome=warnings), pretty=pretty)

    @router.get("/{resource_type}/{logical_id}", summary="read")
    def read(request: Request, resource_type: str, logical_id: str) -> Response:
        pretty = check_format(request)
        _known_type(resource_type)
        principal = api.principal(request, resource_type, "read")
        _known_id(resource_type, logical_id)
        with api.db.read_session() as session:
            resource = store.get(session, resource_type, logical_id)
        if resource is None:
            raise NotFoundError(f"{resource_type}/{logical_id} is not known")
        api.audit(request, principal, _Access("read", resource_type, [resource]))
        headers = _resource_headers(resource, api.base_url(request))
        if _not_modified(request, resource):
            return Response(status_code=304, headers=headers)
        return _fhir_response(resource.content, pretty=pretty, headers=headers)

    @router.get("/{resource_type}/{logical_id}/_history", summary="history of one resource")
    def history(request: Request, resource_type: str, logical_id: str) -> Response:
        pretty = check_format(request)
        _known_type(resource_type)
        principal = api.principal(request, resource_type, "history")
        _known_id(resource_type, logical_id)
        with api.db.read_session() as session:
            versions = store.history(session, resource_type, logical_id)
        if not versions:
            raise NotFoundError(f"{resource_type}/{logical_id} is not known")
        api.audit(request, principal, _Access("history", resource_type, versions))
        base = api.base_url(request)
        body = _bundle("history", base, total=len(versions),
                       links=[("self", f"{base}/{resource_type}/{logical_id}/_history")],
                       entries=[(v, None, v.content) for v in versions])
        return _fhir_response(body, pretty=pretty)

    @router.get("/{resource_type}/{logical_id}/_history/{version_id}", summary="vread")
    def vread(request: Request, resource_type: str, logical_id: str, version_id: str) -> Response:
        pretty = check_format(request)
        _known_type(resource_type)
        principal = api.principal(request, resource_type, "vread")
        _known_id(resource_type, logical_id)
        if not (version_id.isascii() and version_id.isdigit()) or int(version_id) > 2**31 - 1:
            raise NotFoundError(f"{resource_type}/{logical_id} has no version {version_id!r}")
        with api.db.read_session() as session:
            resource = store.get_version(session, resource_type, logical_id, int(version_id))
        if resource is None:
            raise NotFoundError(f"{resource_type}/{logical_id} has no version {version_id}")
        api.audit(request, principal, _Access("vread", resource_type, [resource]))
        headers = _resource_headers(resource, api.base_url(request))
        if _not_modified(request, resource):
            return Response(status_code=304, headers=headers)
        return _fhir_response(resource.content, pretty=pretty, headers=headers)

    async def _json_body(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/fhir+json", "application/json", "application/json+fhir"):
            raise UnsupportedMediaTypeError("send the resource as application/fhir+json")
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInputError("the body is not valid JSON") from exc
        if not isinstance(body, dict):
            raise InvalidInputError("the body is not a FHIR resource")
        return body

    @router.post("/{resource_type}", summary="create (Subscription only)")
    async def create(request: Request, resource_type: str) -> Response:
        _writable(resource_type)
        check_format(request)
        principal = api.principal(request, resource_type, "create")
        body = await _json_body(request)
        stored_body = subscriptions.validate(body, logical_id=None, allowed_endpoints=api.subscription_endpoints)
        return _write(request, principal, stored_body, created=True)

    @router.put("/{resource_type}/{logical_id}", summary="update (Subscription only)")
    async def update(request: Request, resource_type: str, logical_id: str) -> Response:
        _writable(resource_type)
        if not _FHIR_ID.fullmatch(logical_id):
            raise InvalidInputError(f"{logical_id[:80]!r} is not a FHIR id (A-Z, a-z, 0-9, '-' and '.', 1 to 64 characters)")
        check_format(request)
        principal = api.principal(request, resource_type, "update")
        body = await _json_body(request)
        stored_body = subscriptions.validate(body, logical_id=logical_id, allowed_endpoints=api.subscription_endpoints)
        return _write(request, principal, stored_body, created=False)

    def _write(request: Request, principal: Principal, body: dict[str, Any], *, created: bool) -> Response:
        with api.db.session() as session:
            existed = store.get(session, "Subscription", body["id"]) is not None
            stored = store.put(session, body, study_uid=None, now=utcnow())
            if stored is None:
                stored = store.get(session, "Subscription", body["id"])
        assert stored is not None
        log.info("fhir.subscription_saved", subscription=stored.logical_id, version=stored.version_id,
                 client=principal.client_id)
        api.audit(request, principal, _Access("create" if created else "update", "Subscription", [stored]))
        base = api.base_url(request)
        headers = _resource_headers(stored, base)
        headers["Location"] = headers["Content-Location"]
        return _fhir_response(stored.content, pretty=False, status=201 if created or not existed else 200, headers=headers)

    @router.delete("/{resource_type}/{logical_id}", summary="delete (Subscription only)")
    def remove(request: Request, resource_type: str, logical_id: str) -> Response:
        _writable(resource_type)
        principal = api.principal(request, resource_type, "delete")
        _known_id(resource_type, logical_id)
        with api.db.session() as session:
            removed = store.remove(session, resource_type, logical_id)
        if not removed:
            raise NotFoundError(f"{resource_type}/{logical_id} is not known")
        api.audit(request, principal, _Access("delete", resource_type, [
            StoredResource(0, resource_type, logical_id, 0, utcnow(), "{}")]))
        return Response(status_code=204)

    return router


def _writable(resource_type: str) -> None:
    _known_type(resource_type)
    if resource_type not in WRITABLE:
        raise MethodNotAllowedError(f"{resource_type} is read-only here: resources are made from the DICOM results")


def install(app: FastAPI, api: FhirApi) -> None:
    """Mount the FHIR routes on *app* and translate every error under /fhir into an OperationOutcome."""
    from fhir_api.audit_event_routes import build_audit_router  # imports this module: loaded once it is

    app.include_router(build_audit_router(api))  # before the generic /{resource_type} routes
    app.include_router(build_router(api))
    max_bytes = api.settings.max_request_bytes

    def _too_large(scope: Any) -> None:
        client = scope.get("client")
        address = str(client[0]) if client else None
        api.limit_breached(f"address {address or 'unknown'}", address, BODY_TOO_LARGE, f"a body over {max_bytes} bytes")

    def _refuse_too_large(_scope: Any) -> Response:
        return outcome_response(413, "too-long", f"the request body is larger than {max_bytes} bytes")

    app.add_middleware(BodyLimit, max_bytes=max_bytes, refuse=_refuse_too_large, on_breach=_too_large)

    def _is_fhir(request: Request) -> bool:
        return request.url.path.startswith("/fhir")

    @app.exception_handler(PneumoError)
    async def pneumo_error(request: Request, exc: PneumoError) -> Response:
        for kind, status, code in _ERROR_TABLE:
            if isinstance(exc, kind):
                if status in (401, 403):
                    api.trail.record(refused_access_event(
                        api.audit_source, status=status, client_address=request.client.host if request.client else None,
                        path=request.url.path[:200], reason=str(exc), when=utcnow(),
                    ))
                headers = {"WWW-Authenticate": 'Bearer realm="pneumo-gateway", error="invalid_token"'} if status == 401 else None
                return outcome_response(status, code, str(exc), headers=headers)
        log.error("fhir.unexpected_error", error=exc.__class__.__name__)
        return outcome_response(500, "exception", "internal error")

    @app.exception_handler(TooManyRequestsError)
    async def too_many_requests(request: Request, exc: TooManyRequestsError) -> Response:
        return outcome_response(429, "throttled", str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(PayloadTooLargeError)
    async def payload_too_large(request: Request, exc: PayloadTooLargeError) -> Response:
        return outcome_response(413, "too-long", str(exc))

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> Response:
        log.error("fhir.database_unavailable", error=exc.__class__.__name__)
        return outcome_response(503, "transient", "the database is unavailable; retry later", headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return outcome_response(400, "invalid", "the request is not valid: " + "; ".join(
            str(e.get("msg", "")) for e in exc.errors())[:500])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if not _is_fhir(request):
            return Response(json.dumps({"detail": exc.detail}), status_code=exc.status_code, media_type="application/json",
                            headers=dict(exc.headers or {}))
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        return outcome_response(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("http.unexpected_error", error=exc.__class__.__name__, path_kind="fhir" if _is_fhir(request) else "other")
        return outcome_response(500, "exception", "internal error")
