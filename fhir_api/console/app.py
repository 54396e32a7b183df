"""The operator console under ``/console`` (docs/console.md): server-rendered pages over the same
database and audit log as the FHIR API, for the people who run the gateway.

Every page needs a signed-in user (:mod:`fhir_api.console.session`); pages that show patient data
are audited (:mod:`fhir_api.console.audit_events`); every state-changing request is a POST with
the session's CSRF token from this origin. Errors are pages with the HTTP status the FHIR API
would use (one table, :data:`fhir_api.api._ERROR_TABLE`).

The routes are thin: each reads through one storage function (:mod:`storage.study_browser`,
:mod:`storage.throughput`, :mod:`storage.status`, :mod:`storage.outbox`, :mod:`audit.search_index`,
:mod:`storage.model_health`) and renders one template.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Final, ParamSpec
from urllib.parse import unquote, urlencode, urlsplit

import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from audit.anchor import AnchorFile, verify_anchored
from audit.events import AuditEvent, Code, EventId, Outcome
from audit.export import FORMATS, audit_log_used, export
from audit.search_index import AuditQuery, DateBound, search
from audit.store import AuditSigner
from conf.errors import (
    AuthenticationError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    PneumoError,
    UnavailableError,
)
from conf.settings import ConsoleSettings
from fhir_api.api import _ERROR_TABLE, FhirApi
from fhir_api.audit_event_routes import _catch_up
from fhir_api.audit_event_search import PatientReferences
from fhir_api.auth import is_loopback
from fhir_api.console import audit_events, charts, oidc
from fhir_api.console.images import render_png
from fhir_api.console.render import Templates
from fhir_api.console.security import ConsoleHeaders
from fhir_api.console.session import COOKIE_NAME, ConsoleUser, Role, SessionCodec
from fhir_api.ids import diagnostic_report_id, imaging_study_id
from fhir_api.store import get as get_resource
from storage import outbox, status, study_browser, throughput
from storage.console_outbox import list_deliveries_page
from storage.model_health import ModelHealth
from storage.models import Instance, Series, Study, utcnow

log = structlog.get_logger(__name__)

PREFIX: Final = "/console"
MODEL_REPORT_SECONDS: Final = 10.0
_OIDC_COOKIE: Final = "pneumo_console_oidc"
_P = ParamSpec("_P")

#: The audit actions an operator filters by: the DICOM Event IDs (CID 400) the gateway records.
AUDIT_ACTIONS: Final[tuple[tuple[str, str], ...]] = tuple(
    (code.code, code.display) for code in vars(EventId).values() if isinstance(code, Code)
)
_ACTION_NAMES: Final = dict(AUDIT_ACTIONS)
_OUTCOMES: Final = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure"}
_RESULT_CHOICES: Final = ("positive", "negative", "not-analysed", "pending")
_DELIVERY_CHOICES: Final = ("none", "pending", "done", "failed")
_STATE_CHOICES: Final = ("pending", "running", "done", "failed")
#: The largest ids the database stores: a delivery (``job.id``, INTEGER) and an audit record
#: (``audit_record.seq``, BIGINT); a larger number in a URL is refused, not sent to the database.
_MAX_JOB_ID: Final = 2**31 - 1
_MAX_AUDIT_SEQ: Final = 2**63 - 1
_NOTICES: Final = {
    "retried": "Delivery {job} re-queued: it will be sent again.",
    "not-retried": "Delivery {job} is not a dead letter: nothing was done.",
    "signed-out": "You are signed out.",
}


@dataclass(frozen=True)
class ModelSource:
    """What the composition root tells the console about the model: its label for the overview
    (cheap) and the full health report for the Model page (queries the database)."""

    label: str | None
    health: Callable[[], ModelHealth | None]


class _Recent:
    """The Model page's report, recomputed at most every *seconds*: it reads thousands of results
    (the drift windows), and a window of 500 images does not change in a few seconds."""

    def __init__(self, compute: Callable[[], ModelHealth | None], seconds: float = MODEL_REPORT_SECONDS) -> None:
        self._compute = compute
        self._seconds = seconds
        self._lock = threading.Lock()
        self._value: ModelHealth | None = None
        self._at = -math.inf

    def __call__(self) -> ModelHealth | None:
        with self._lock:  # one computation at a time; the others wait for its result
            if time.monotonic() - self._at > self._seconds:
                self._value = self._compute()
                self._at = time.monotonic()
            return self._value


def _status_of(exc: PneumoError) -> int:
    return next((status_code for kind, status_code, _ in _ERROR_TABLE if isinstance(exc, kind)), 500)


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _date(raw: str | None, what: str) -> dt.date | None:
    if not raw:
        return None
    try:
        value = dt.date.fromisoformat(raw)
    except ValueError:
        raise InvalidInputError(f"{what}: {raw[:20]!r} is not a date (YYYY-MM-DD)") from None
    if value >= dt.date.max:  # the day after it (an exclusive bound) is not a date
        raise InvalidInputError(f"{what}: {raw[:20]!r} is out of range")
    return value


def _number(raw: str | None, what: str, maximum: int) -> int | None:
    """A paging cursor (a row id): ASCII digits, at most *maximum*."""
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > maximum:
        raise InvalidInputError(f"{what}: not a valid number")
    return int(raw)


def _delivery_id(raw: str) -> int:
    """A delivery (job) id from the path; anything else names no delivery (404, not a 500 or a 422)."""
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= _MAX_JOB_ID:
        raise NotFoundError(f"there is no delivery {raw[:20]!r}")
    return int(raw)


def _choice(raw: str | None, choices: tuple[str, ...], what: str) -> str | None:
    if not raw:
        return None
    if raw not in choices:
        raise InvalidInputError(f"{what}: {raw[:40]!r} is not one of {', '.join(choices)}")
    return raw


def _safe_next(raw: str | None) -> str:
    """Only a path inside the console (no scheme, no host, no ``//``): no open redirect."""
    if raw and raw.startswith(PREFIX + "/") and not raw.startswith("//") and "\\" not in raw and not urlsplit(raw).netloc:
        segments = unquote(urlsplit(raw).path).split("/")
        if "." not in segments and ".." not in segments:  # no /console/../ out of the console
            return raw
    return PREFIX + "/"


class Console:
    """The console's state: the FHIR API's (database, files, verifier, audit trail) and its own."""

    def __init__(
        self, api: FhirApi, settings: ConsoleSettings, *, bind: str, signer: AuditSigner, anchor_file: AnchorFile,
        model: ModelSource, token_endpoint: str | None = None, codec: SessionCodec | None = None,
    ) -> None:
        if settings.dev_login and not is_loopback(bind):
            raise InvalidInputError(
                f"console.dev_login needs a loopback [fhir] bind (127.0.0.1, ::1 or localhost), not {bind!r}: "
                "anyone who reaches the port could sign in as an operator. Configure [console.oidc] instead."
            )
        self.api = api
        self.settings = settings
        self.signer = signer
        self.anchor_file = anchor_file
        self.model = model
        self.model_health = _Recent(model.health)
        self.token_endpoint = settings.oidc.token_endpoint or token_endpoint
        self.codec = codec or SessionCodec()
        self.templates = Templates()
        self.oidc_enabled = oidc.configured(settings.oidc, self.token_endpoint)

    # -- sessions ------------------------------------------------------------------------------

    def user(self, request: Request) -> ConsoleUser | None:
        return self.codec.read(request.cookies.get(COOKIE_NAME))

    def require_user(self, request: Request) -> ConsoleUser:
        user = self.user(request)
        if user is None:
            raise _SignInNeeded()
        return user

    def check_post(self, request: Request, user: ConsoleUser | None, token: str | None) -> None:
        """A state-changing request: from this origin, and (once signed in) with the session's CSRF token."""
        origin = request.headers.get("origin")
        public = urlsplit(self.api.base_url(request))  # [fhir] base_url behind a TLS-terminating proxy
        expected = f"{public.scheme}://{public.netloc}"
        if origin is not None and origin != expected:
            raise PermissionDeniedError("refused: the form was sent from another site")
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise PermissionDeniedError("refused: the form was sent from another site")
        if user is not None and not self.codec.csrf_valid(user, token):
            raise PermissionDeniedError("refused: the form's security token is missing or stale; reload the page and try again")

    def start_session(self, request: Request, *, name: str, subject: str, role: Role, via: str,
                      lifetime: float, target: str) -> Response:
        cookie = self.codec.issue(name=name, subject=subject, role=role, lifetime_seconds=lifetime, via=via)
        response = RedirectResponse(_safe_next(target), status_code=303)
        response.set_cookie(COOKIE_NAME, cookie, max_age=int(lifetime), path=PREFIX, httponly=True,
                            secure=request.url.scheme == "https", samesite="lax")
        self.audit(audit_events.sign_in(
            self.api.audit_source, user_id=subject, user_name=name, address=_client(request), when=utcnow(),
            outcome=Outcome.SUCCESS, detail=f"signed in ({via}, role {role.value})",
        ))
        return response

    def audit(self, event: AuditEvent) -> None:
        self.api.trail.record(event)

    # -- rendering -----------------------------------------------------------------------------

    def page(self, request: Request, user: ConsoleUser | None, name: str, context: dict[str, Any],
             *, status_code: int = 200) -> Response:
        notice = request.query_params.get("done")
        job = request.query_params.get("job", "")
        message = _NOTICES.get(notice or "", "").format(job=job if job.isascii() and job.isdigit() else "")
        return self.templates.page(name, {
            "user": user, "csrf": self.codec.csrf_token(user) if user else "", "prefix": PREFIX,
            "notice": message or None, "path": request.url.path, **context,
        }, status_code=status_code)

    def error_page(self, request: Request, exc: PneumoError) -> Response:
        status_code = _status_of(exc)
        if status_code >= 500:
            log.warning("console.error", error=exc.__class__.__name__, status=status_code)
        return self.page(request, self.user(request), "error.html",
                         {"title": f"Error {status_code}", "status_code": status_code, "message": str(exc)},
                         status_code=status_code)


class _SignInNeeded(Exception):
    """A page was asked for without a session: the browser is sent to the sign-in page."""


def _failed(console: Console, request: object, exc: Exception) -> Response:
    """The page for a request that failed: the sign-in page when there is no session (for a
    GET; a POST without one is refused), else the error page with the error's status. Every
    route names its request ``request`` (FastAPI passes it by keyword)."""
    assert isinstance(request, Request)
    if isinstance(exc, _SignInNeeded):
        if request.method == "GET":
            return RedirectResponse(f"{PREFIX}/login?" + urlencode({"next": request.url.path}), status_code=303)
        exc = AuthenticationError("sign in first")
    assert isinstance(exc, PneumoError)
    return console.error_page(request, exc)


def _pages(console: Console) -> Callable[[Callable[_P, Response]], Callable[_P, Response]]:
    """Route decorator (plain handlers, run in the thread pool): errors become pages."""

    def decorate(handler: Callable[_P, Response]) -> Callable[_P, Response]:
        @functools.wraps(handler)
        def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> Response:
            try:
                return handler(*args, **kwargs)
            except (_SignInNeeded, PneumoError) as exc:
                return _failed(console, kwargs["request"], exc)

        return wrapped

    return decorate


def _async_pages(
    console: Console,
) -> Callable[[Callable[_P, Awaitable[Response]]], Callable[_P, Coroutine[Any, Any, Response]]]:
    """Route decorator for the form handlers (async: they await the form body)."""

    def decorate(handler: Callable[_P, Awaitable[Response]]) -> Callable[_P, Coroutine[Any, Any, Response]]:
        @functools.wraps(handler)
        async def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> Response:
            try:
                return await handler(*args, **kwargs)
            except (_SignInNeeded, PneumoError) as exc:
                return _failed(console, kwargs["request"], exc)

        return wrapped

    return decorate


# ------------------------------------------------------------------------------------ routes


def build_console_router(console: Console) -> APIRouter:  # noqa: C901 (one route table)
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    pages = _pages(console)
    form_pages = _async_pages(console)
    settings = console.settings
    api = console.api

    # -- signing in and out ------------------------------------------------------------------------

    @router.get("/login")
    @pages
    def login_form(request: Request) -> Response:
        return console.page(request, console.user(request), "login.html", {
            "title": "Sign in", "next": _safe_next(request.query_params.get("next")),
            "dev_login": settings.dev_login and is_loopback(_client(request) or ""), "oidc": console.oidc_enabled,
            "error": None,
        })

    @router.post("/login")
    @form_pages
    async def dev_login(request: Request) -> Response:
        form = await request.form()
        console.check_post(request, None, None)
        if not settings.dev_login or not is_loopback(_client(request) or ""):
            raise PermissionDeniedError("the development sign-in is off (or you are not on this machine)")
        name = str(form.get("name", "")).strip()[:64]
        role = str(form.get("role", ""))
        if not name or role not in (Role.READ.value, Role.OPERATE.value):
            raise InvalidInputError("give a name and choose a role")
        return console.start_session(request, name=name, subject=f"dev:{name}", role=Role(role), via="dev",
                                     lifetime=settings.session_minutes * 60, target=str(form.get("next", "")))

    @router.get("/auth/start")
    @pages
    def oidc_start(request: Request) -> Response:
        url, pending = oidc.start(settings.oidc, _redirect_uri(console, request), _safe_next(request.query_params.get("next")))
        response = RedirectResponse(url, status_code=303)
        response.set_cookie(_OIDC_COOKIE, console.codec.sign("oidc", pending.dumps()), max_age=600, path=f"{PREFIX}/auth",
                            httponly=True, secure=request.url.scheme == "https", samesite="lax")
        return response

    @router.get("/auth/callback")
    @pages
    def oidc_callback(request: Request) -> Response:
        params = request.query_params
        raw = console.codec.unsign("oidc", request.cookies.get(_OIDC_COOKIE))
        pending = oidc.Pending.loads(raw) if raw else None
        try:
            if params.get("error"):
                raise AuthenticationError(f"sign-in refused by the identity provider ({params['error'][:64]})")
            if pending is None or not params.get("code") or not params.get("state"):
                raise AuthenticationError("sign-in refused: this browser has no sign-in in progress (start again)")
            token = oidc.exchange(settings.oidc, console.token_endpoint or "", code=params["code"], state=params["state"],
                                  pending=pending, redirect_uri=_redirect_uri(console, request))
            principal = api.verifier.verify(f"Bearer {token}")
            if settings.operate_scope in principal.scopes:
                role = Role.OPERATE
            elif settings.read_scope in principal.scopes:
                role = Role.READ
            else:
                raise PermissionDeniedError(f"your account may not use the console (it needs the scope {settings.read_scope})")
        except (AuthenticationError, PermissionDeniedError) as exc:
            console.audit(audit_events.sign_in(
                api.audit_source, user_id=_client(request) or "unknown", user_name=None, address=_client(request),
                when=utcnow(), outcome=Outcome.MINOR_FAILURE, detail=str(exc),
            ))
            raise
        subject = principal.subject or principal.client_id
        lifetime = settings.session_minutes * 60.0
        if principal.expires_at is not None:
            lifetime = min(lifetime, principal.expires_at.timestamp() - time.time())
        if lifetime <= 0:
            raise AuthenticationError("sign-in refused: the token has already expired")
        name = (principal.display_name or subject)[:64]
        response = console.start_session(request, name=name, subject=subject, role=role, via="oidc",
                                         lifetime=lifetime, target=pending.return_to)
        response.delete_cookie(_OIDC_COOKIE, path=f"{PREFIX}/auth")
        return response

    @router.post("/logout")
    @form_pages
    async def logout(request: Request) -> Response:
        form = await request.form()
        user = console.require_user(request)
        console.check_post(request, user, str(form.get("csrf_token", "")))
        console.codec.revoke(user)
        console.audit(audit_events.sign_in(
            api.audit_source, user_id=user.subject, user_name=user.name, address=_client(request), when=utcnow(),
            outcome=Outcome.SUCCESS, detail="signed out", logout=True,
        ))
        response = RedirectResponse(f"{PREFIX}/login?done=signed-out", status_code=303)
        response.delete_cookie(COOKIE_NAME, path=PREFIX)
        return response

    # -- overview ------------------------------------------------------------------------------

    @router.get("/")
    @pages
    def overview(request: Request) -> Response:
        user = console.require_user(request)
        now = utcnow()
        with api.db.read_session() as session:
            minutes = throughput.throughput(session, now, minutes=60)
            queues = status.queue_depths(session, now)
            dead = status.dead_letters(session)
            destinations = status.destination_health(session)
            peers = throughput.dicom_peers(session, now)
        names = ("received", "analysed", "not analysed", "delivered")
        groups = [(m.received, m.analysed, m.not_analysed, m.delivered) for m in minutes]
        totals = [sum(g[i] for g in groups) for i in range(len(names))]
        labels = [m.minute.strftime("%H:%M") for m in minutes]
        return console.page(request, user, "overview.html", {
            "title": "Overview", "now": now, "minutes": minutes, "totals": dict(zip(names, totals, strict=True)),
            "chart": charts.grouped_bar_chart(groups, labels, names), "series_names": names,
            "queues": queues, "dead": dead, "destinations": destinations, "peers": peers, "model_label": console.model.label,
        })

    # -- studies ---------------------------------------------------------------------------------

    @router.get("/studies")
    @pages
    def studies(request: Request) -> Response:
        user = console.require_user(request)
        q = request.query_params
        flt = study_browser.StudyFilter(
            received_from=_date(q.get("from"), "Received from"), received_to=_date(q.get("to"), "Received to"),
            modality=(q.get("modality") or "").strip().upper()[:16] or None,
            result=_choice(q.get("result"), _RESULT_CHOICES, "Result"),  # type: ignore[arg-type]
            delivery=_choice(q.get("delivery"), _DELIVERY_CHOICES, "Delivery"),  # type: ignore[arg-type]
            text=(q.get("q") or "").strip()[:64] or None,
        )
        with api.db.read_session() as session:
            found = study_browser.list_studies(session, flt, limit=settings.page_size, after=q.get("after") or None)
        if found.rows:
            console.audit(audit_events.studies_listed(
                api.audit_source, user, address=_client(request), when=utcnow(), query=str(request.url.query),
                patients=[row.patient_id for row in found.rows if row.patient_id],
            ))
        kept = [(k, v) for k, v in q.multi_items() if k not in ("after", "done", "job") and v]
        return console.page(request, user, "studies.html", {
            "title": "Studies", "page": found, "filters": dict(kept), "results": _RESULT_CHOICES,
            "deliveries": _DELIVERY_CHOICES,
            "next_url": f"{PREFIX}/studies?" + urlencode([*kept, ("after", found.next_cursor)]) if found.next_cursor else None,
            "first_url": f"{PREFIX}/studies?" + urlencode(kept) if q.get("after") else None,
        })

    def _detail(session: Any, uid: str) -> study_browser.StudyDetail:
        detail = study_browser.study_detail(session, uid[:64])
        if detail is None:
            raise NotFoundError("no study with this Study Instance UID has been received")
        return detail

    def _viewed(request: Request, user: ConsoleUser, detail: study_browser.StudyDetail, what: str) -> None:
        console.audit(audit_events.study_viewed(
            api.audit_source, user, address=_client(request), when=utcnow(), study_uid=detail.row.study_instance_uid,
            patient_id=detail.patient.patient_id, patient_name=detail.patient.name, what=what,
        ))

    @router.get("/studies/{uid}")
    @pages
    def study(request: Request, uid: str) -> Response:
        user = console.require_user(request)
        try:
            up_to: int | None = _catch_up(api)
        except UnavailableError:  # the audit index is still being built (after an upgrade): the study still shows
            up_to = None
        with api.db.read_session() as session:
            detail = _detail(session, uid)
            timeline = None
            if up_to is not None:
                # The study's DICOM, HL7 and console records name its UID; FHIR reads name its resources.
                about = [uid, f"DiagnosticReport/{diagnostic_report_id(uid)}", f"ImagingStudy/{imaging_study_id(uid)}"]
                records, _ = search(session, AuditQuery(values={"entity": [about]}, count=100, up_to_seq=up_to))
                timeline = [_audit_row(r) for r in records]
        _viewed(request, user, detail, "opened the study page")
        return console.page(request, user, "study.html", {
            "title": f"Study {detail.row.accession_number or ''}".strip(), "detail": detail, "timeline": timeline,
            "report_id": diagnostic_report_id(detail.row.study_instance_uid),
            "fhir_base": api.base_url(request),
            "summary": next((g for g in detail.generated if g.kind == "summary-image"), None),
            "sr": next((g for g in detail.generated if g.kind == "sr"), None),
        })

    def _generated(detail: study_browser.StudyDetail, kind: str) -> study_browser.GeneratedObjectRow:
        found = next((g for g in detail.generated if g.kind == kind), None)
        if found is None:
            raise NotFoundError(f"this study has no {'summary image' if kind == 'summary-image' else 'structured report'} yet")
        return found

    @router.get("/studies/{uid}/summary.png")
    @pages
    def summary_png(request: Request, uid: str) -> Response:
        user = console.require_user(request)
        with api.db.read_session() as session:
            detail = _detail(session, uid)
        png = render_png(api.files, _generated(detail, "summary-image").path)
        _viewed(request, user, detail, "viewed the summary image")
        return Response(png, media_type="image/png")

    @router.get("/studies/{uid}/images/{sop_uid}.png")
    @pages
    def image_png(request: Request, uid: str, sop_uid: str) -> Response:
        user = console.require_user(request)
        with api.db.read_session() as session:
            detail = _detail(session, uid)
            path = session.execute(
                select(Instance.path).join(Series, Instance.series_pk == Series.id).join(Study, Series.study_pk == Study.id)
                .where(Instance.sop_instance_uid == sop_uid[:64], Study.study_instance_uid == uid[:64])
            ).scalar_one_or_none()
        if path is None:
            raise NotFoundError("no such image in this study")
        png = render_png(api.files, path, max_size=256)
        _viewed(request, user, detail, "viewed an image")
        return Response(png, media_type="image/png")

    @router.get("/studies/{uid}/sr.dcm")
    @pages
    def download_sr(request: Request, uid: str) -> Response:
        user = console.require_user(request)
        with api.db.read_session() as session:
            detail = _detail(session, uid)
        content = api.files.read_bytes(_generated(detail, "sr").path)
        _viewed(request, user, detail, "downloaded the structured report")
        return Response(content, media_type="application/dicom",
                        headers={"Content-Disposition": 'attachment; filename="pneumo-sr.dcm"'})

    @router.get("/studies/{uid}/report")
    @pages
    def fhir_report(request: Request, uid: str) -> Response:
        user = console.require_user(request)
        report_id = diagnostic_report_id(uid[:64])
        with api.db.read_session() as session:
            detail = _detail(session, uid)
            stored = get_resource(session, "DiagnosticReport", report_id)
        if stored is None:
            raise NotFoundError("the FHIR DiagnosticReport of this study does not exist yet (no result, or not projected yet)")
        _viewed(request, user, detail, "read the FHIR DiagnosticReport")
        return console.page(request, user, "report.html", {
            "title": "FHIR DiagnosticReport", "detail": detail, "report_id": report_id, "fhir_base": api.base_url(request),
            "version": stored.version_id, "json_text": json.dumps(json.loads(stored.content), indent=2, ensure_ascii=False),
        })

    # -- outbox ------------------------------------------------------------------------------

    @router.get("/outbox")
    @pages
    def outbox_page(request: Request) -> Response:
        user = console.require_user(request)
        q = request.query_params
        state = _choice(q.get("state"), _STATE_CHOICES, "State")
        channel = _choice(q.get("channel"), tuple(c.value for c in outbox.Channel), "Channel")
        after = _number(q.get("after"), "after: delivery id", _MAX_JOB_ID)
        with api.db.read_session() as session:
            rows, next_after = list_deliveries_page(session, state=state, channel=channel, limit=settings.page_size,
                                                    after_id=after)
        kept = [(k, v) for k, v in (("state", state), ("channel", channel)) if v]
        return console.page(request, user, "outbox.html", {
            "title": "Outbox", "rows": rows, "state": state, "channel": channel, "states": _STATE_CHOICES,
            "channels": [c.value for c in outbox.Channel],
            "next_url": f"{PREFIX}/outbox?" + urlencode([*kept, ("after", next_after)]) if next_after else None,
        })

    @router.get("/outbox/{job}")
    @pages
    def delivery_page(request: Request, job: str) -> Response:
        user = console.require_user(request)
        job_id = _delivery_id(job)
        with api.db.read_session() as session:
            delivery = outbox.show_delivery(session, job_id)
        if delivery is None:
            raise NotFoundError(f"there is no delivery {job_id}")
        return console.page(request, user, "delivery.html", {"title": f"Delivery {job_id}", "delivery": delivery})

    @router.post("/outbox/{job}/retry")
    @form_pages
    async def retry(request: Request, job: str) -> Response:
        form = await request.form()
        user = console.require_user(request)
        console.check_post(request, user, str(form.get("csrf_token", "")))
        if not user.may_operate:
            raise PermissionDeniedError("your role may look but not act: retrying needs the operator role")
        job_id = _delivery_id(job)

        def requeue() -> list[int]:
            with api.db.session() as session:
                return outbox.retry_deliveries(session, [job_id], audit_source=api.audit_source,
                                               operator=user.name, host=_client(request))

        done = await run_in_threadpool(requeue)
        log.info("console.retry", job=job_id, requeued=bool(done))
        back = _safe_next(str(form.get("next", "")) or f"{PREFIX}/outbox")
        separator = "&" if "?" in back else "?"
        notice = "retried" if done else "not-retried"
        return RedirectResponse(f"{back}{separator}" + urlencode({"done": notice, "job": job_id}), status_code=303)

    # -- audit -------------------------------------------------------------------------------

    def _audit_query(request: Request, up_to: int) -> tuple[AuditQuery, dict[str, str]]:
        q = request.query_params
        values: dict[str, list[list[str]]] = {}
        for field_name, param in (("actor", "agent"), ("patient", "patient"), ("study", "entity")):
            raw = (q.get(field_name) or "").strip()[:255]
            if raw:
                values[param] = [[raw]]
        action = _choice(q.get("action"), tuple(code for code, _ in AUDIT_ACTIONS), "Action")
        if action:
            values["type"] = [[action]]
        dates = []
        since, until = _date(q.get("from"), "From"), _date(q.get("to"), "To")
        if since:
            low = dt.datetime.combine(since, dt.time(), dt.UTC)
            dates.append(DateBound("ge", low, low + dt.timedelta(days=1)))
        if until:
            low = dt.datetime.combine(until, dt.time(), dt.UTC)
            dates.append(DateBound("le", low, low + dt.timedelta(days=1)))
        before = _number(q.get("before"), "before: record number", _MAX_AUDIT_SEQ)
        query = AuditQuery(values=values, dates=dates, count=settings.page_size, before_seq=before, up_to_seq=up_to)
        kept = {k: v for k, v in q.items() if k in ("actor", "patient", "study", "action", "from", "to") and v}
        return query, kept

    def _audit_page(request: Request, user: ConsoleUser, verification: Any = None) -> Response:
        up_to = _catch_up(api)
        query, kept = _audit_query(request, up_to)
        with api.db.read_session() as session:
            records, more = search(session, query)
            rows = [_audit_row(r) for r in records]
        console.audit(audit_log_used(
            api.audit_source, user=user.subject, host=_client(request), when=utcnow(),
            description=f"console audit search: {len(rows)} records shown", query=urlencode(kept),
        ))
        return console.page(request, user, "audit.html", {
            "title": "Audit log", "rows": rows, "filters": kept, "actions": AUDIT_ACTIONS, "verification": verification,
            "formats": FORMATS, "today": dt.date.today().isoformat(),
            "next_url": f"{PREFIX}/audit?" + urlencode([*kept.items(), ("before", rows[-1]["seq"])]) if more and rows else None,
        })

    @router.get("/audit")
    @pages
    def audit_page(request: Request) -> Response:
        return _audit_page(request, console.require_user(request))

    @router.post("/audit/verify")
    @form_pages
    async def audit_verify(request: Request) -> Response:
        form = await request.form()
        user = console.require_user(request)
        console.check_post(request, user, str(form.get("csrf_token", "")))
        def verify() -> Any:
            with api.db.read_session() as session:
                return verify_anchored(session, console.signer, console.anchor_file)

        started = time.perf_counter()
        result = await run_in_threadpool(verify)
        console.audit(audit_log_used(
            api.audit_source, user=user.subject, host=_client(request), when=utcnow(),
            description=f"console: verified the audit chain ({result.records} records, "
                        f"{'intact' if result.ok else f'broken at {result.first_bad_seq}'})",
        ))
        return await run_in_threadpool(_audit_page, request, user, {"result": result, "seconds": time.perf_counter() - started})

    @router.get("/audit/export")
    @pages
    def audit_export(request: Request) -> Response:
        user = console.require_user(request)
        if not user.may_operate:
            raise PermissionDeniedError("exporting the audit log needs the operator role")
        q = request.query_params
        since_day = _date(q.get("from"), "From") or dt.date.today()
        until_day = _date(q.get("to"), "To") or since_day
        fmt = _choice(q.get("format") or "fhir", tuple(FORMATS), "Format") or "fhir"
        since = dt.datetime.combine(since_day, dt.time(), dt.UTC)
        until = min(dt.datetime.combine(until_day + dt.timedelta(days=1), dt.time(), dt.UTC), utcnow())
        if until <= since:
            raise InvalidInputError("To must not be before From")
        console.audit(audit_log_used(
            api.audit_source, user=user.subject, host=_client(request), when=utcnow(),
            description=f"console: audit export {fmt} {since.isoformat()} to {until.isoformat()}",
            query=f"since {since.isoformat()} until {until.isoformat()}",
        ))

        # Spooled: an export of a day fits in memory, a year's goes to a temporary file (never the page's memory).
        spool = tempfile.SpooledTemporaryFile(max_size=8 * 2**20)  # noqa: SIM115 (closed by the generator)
        with api.db.read_session() as session:
            export(session, spool, since=since, until=until, fmt=fmt,  # type: ignore[arg-type]
                   patient_reference=PatientReferences(session) if fmt == "fhir" else None)
        spool.seek(0)

        def stream() -> Iterator[bytes]:
            with spool:
                while chunk := spool.read(2**16):
                    yield chunk

        extension = "xml" if fmt == "dicom" else "ndjson"
        return StreamingResponse(stream(), media_type="application/xml" if fmt == "dicom" else "application/x-ndjson",
                                 headers={"Content-Disposition": f'attachment; filename="pneumo-audit-{since_day}.{extension}"'})

    # -- model -------------------------------------------------------------------------------

    @router.get("/model")
    @pages
    def model_page(request: Request) -> Response:
        user = console.require_user(request)
        health = console.model_health()
        context: dict[str, Any] = {"title": "Model", "health": health}
        if health is not None:
            hist = health.probability_histogram
            labels = [f"{hist.edges[i]:.2f}–{hist.edges[i + 1]:.2f}: {hist.counts[i]}" for i in range(len(hist.counts))]
            context["histogram"] = charts.bar_chart([float(c) for c in hist.counts], labels)
            context["drift_line"] = charts.line_chart(
                [p.max_psi or 0.0 for p in health.drift_points], threshold=health.current_drift.psi_alert)
            context["manifest_json"] = json.dumps(health.manifest, indent=2, ensure_ascii=False, default=str)
        return console.page(request, user, "model.html", context)

    return router


def _redirect_uri(console: Console, request: Request) -> str:
    return console.settings.oidc.redirect_uri or str(request.url_for("oidc_callback"))


def _audit_row(record: Any) -> dict[str, Any]:
    """One audit record as the page lists it: when, what, who, about what, outcome."""
    event = record.event if isinstance(record.event, dict) else {}
    participants = event.get("participants") or []
    requestor = next((p for p in participants if p.get("user_is_requestor")), participants[0] if participants else {})
    objects = [
        f"{(o.get('id_type') or {}).get('display', 'object')}: {o.get('object_id', '')}"
        for o in (event.get("objects") or [])[:4]
    ]
    types = ", ".join(str(t.get("display", t.get("code", ""))) for t in (event.get("event_types") or []))
    event_id = (event.get("event_id") or {}).get("code", record.event_id)
    return {
        "seq": record.seq, "recorded_at": record.recorded_at,
        "action": _ACTION_NAMES.get(str(event_id), str((event.get("event_id") or {}).get("display", event_id))),
        "types": types, "outcome": _OUTCOMES.get(int(record.outcome), str(record.outcome)),
        "failed": int(record.outcome) != 0,
        "actor": requestor.get("user_name") or requestor.get("user_id") or "—",
        "actor_id": requestor.get("user_id") or "",
        "objects": objects, "description": event.get("outcome_description") or "",
    }


def install_console(app: FastAPI, console: Console) -> None:
    """Mount the console on *app*: its pages, its static files and its response headers."""
    app.include_router(build_console_router(console))
    app.mount(f"{PREFIX}/static", StaticFiles(packages=[("fhir_api.console", "static")]), name="console-static")
    app.add_middleware(ConsoleHeaders, prefix=PREFIX, static_prefix=f"{PREFIX}/static/")

    @app.get(PREFIX, include_in_schema=False)
    def console_root() -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=308)


