"""Fuzzing the FHIR API over real HTTP: schemathesis over FastAPI's OpenAPI document, and search queries of our own.

One server for the module (uvicorn on a free port, SQLite migrated in a temporary directory, three published
reports of two patients, their SR files on disk for ``Binary``). Three sources of requests:

* schemathesis (``schemathesis.openapi.from_url`` on the running server's ``/openapi.json``): every operation,
  with path parameters generated from their schema (any string) and, as often as not, from the resource types,
  ids and versions the server really has or chokes on (schemathesis dictionaries); then the same operations with
  fixed edge values (:data:`EDGE_VALUES`), since random strings rarely name a resource type;
* :func:`search_requests`: the search routes take the ``Request`` itself, so their OpenAPI lists no query
  parameters and schemathesis never sends one. The strategy builds query strings (``GET /fhir/<type>``) and form
  bodies (``POST /fhir/<type>/_search``) from the registered parameter names and junk: modifiers, date prefixes,
  token ``|`` and ``\\`` escapes, includes, sorts, ``_count`` of every shape, ``_cursor`` from garbage to real
  cursors and well-formed ones carrying out-of-range numbers;
* :func:`subscription_writes`: the write routes read their body from the ``Request`` too, so schemathesis sends
  none. The strategy mutates a valid Subscription (any field replaced by junk or removed), picks an id from valid
  FHIR ids and strings that are not, and sends it as a create, update or delete, with odd content types;
* methods the OpenAPI does not list for a path (what schemathesis's coverage phase would send).

Each request carries a ``system/*.*`` or ``system/*.cruds`` token, a read-only or a one-type token, a broken token
or none. Whatever is sent: no 5xx; every error under ``/fhir`` is ``application/fhir+json`` and an OperationOutcome
(fhir.resources R4B); every success is JSON (a searchset Bundle for a search), ``Binary`` aside, which serves the
DICOM file itself unless FHIR JSON is asked for.

Deterministic: Hypothesis runs with ``derandomize`` (its examples follow from the test's source and the modules
loaded) and no example database, schemathesis without the constants it would otherwise mine from the running
process (their order follows string hashing), so a CI command sends the same requests on every run. What the
generators reach only with a lucky seed and has broken before is also sent as fixed cases (:data:`EDGE_VALUES`,
:data:`SEARCH_EDGES`, :data:`WRITE_EDGES`). ``schemathesis.pytest.from_fixture`` is not used: with pytest 9.2 its
lazy parametrization fails (``'Function' object has no attribute '_nodeid'``), so the operations are walked here,
one Hypothesis run each.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import httpx
import pytest
import schemathesis
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.subscription import Subscription
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.schemas import APIOperation, BaseSchema

from fhir_api.search_params import DATE_PREFIXES, SEARCH_PARAMS
from storage.db import Database
from storage.migrate import upgrade
from tests.fhir_api.builders import T0, StudyBuilder
from tests.fhir_api.test_api import Server
from tests.fhir_api.tokens import TokenService

SEED = 20261130
BASE_UID = "1.2.826.0.1.3680043.8.498.3000"
RESOURCE_TYPES = sorted(SEARCH_PARAMS)
#: Generated cases per OpenAPI operation (13 operations, about 400 requests with the edge values).
OPERATION_EXAMPLES = 30
#: Generated searches (GET and POST), about 7 ms each.
SEARCH_EXAMPLES = 600
#: Generated Subscription writes (create, update, delete).
WRITE_EXAMPLES = 250

#: Who calls: most requests get past authentication, some are refused (401/403) before anything else runs.
AUTHS = ("system/*.*", "system/*.cruds", "system/*.*", "system/*.cruds", "system/*.read", "system/Observation.rs",
         "no token", "broken token", "basic")
ACCEPTS = (None, None, "application/fhir+json", "application/json", "*/*", "application/fhir+xml", "text/html")
SUBSETTED = "SUBSETTED"
#: R4 datatypes, id: "Any combination of upper- or lower-case ASCII letters, numerals, '-' and '.', with a length limit of 64".
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@dataclass
class Target:
    """The running server and what it holds, as the generators need it."""

    server: Server
    root: str
    ids: dict[str, list[str]]
    binaries: list[str]
    cursors: list[str]
    auth_headers: dict[str, dict[str, str]] = field(default_factory=dict)
    #: No keep-alive: a 500 makes uvicorn drop the connection, which must not fail the next request instead.
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.server.base, timeout=10, limits=httpx.Limits(max_keepalive_connections=0))

    def headers(self, auth: str, accept: str | None = None, prefer: str | None = None) -> dict[str, str]:
        headers = dict(self.auth_headers[auth])
        if accept is not None:
            headers["Accept"] = accept
        if prefer is not None:
            headers["Prefer"] = prefer
        return headers

    @property
    def all_ids(self) -> list[str]:
        return sorted({i for found in self.ids.values() for i in found})


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    directory = tmp_path_factory.mktemp("fhir-fuzz")
    database = Database(f"sqlite:///{directory / 'pneumo.db'}")
    upgrade(database)
    ids: dict[str, set[str]] = {}
    binaries: list[str] = []
    for n, patient in enumerate(("PAT-001", "PAT-001", "PAT-002")):
        uid = f"{BASE_UID}.{n}"
        study = StudyBuilder(database, uid, patient_id=patient, study_date=f"202611{n + 1:02d}")
        study.image(0.3 + n / 5, at=T0 + dt.timedelta(minutes=n))
        study.study_result(1, "final", at=T0 + dt.timedelta(minutes=n, seconds=10), label="PNEUMONIA", probability=0.7,
                           analysed=1)
        stored, _ = study.publish()
        for resource in stored:
            ids.setdefault(resource.resource_type, set()).add(resource.logical_id)
        binaries.append(f"{uid}.9901.1")  # the SR the builder indexes for the study's first image
    tokens = TokenService(directory / "idp")
    server = Server(database, directory, tokens)
    for sop_uid in binaries:  # the SR files the DiagnosticReports cite (presentedForm -> Binary)
        path = server.api.files.absolute(f"x/{sop_uid}.dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 128 + b"DICM")
    auth_headers: dict[str, dict[str, str]] = {
        "no token": {}, "broken token": {"Authorization": "Bearer not.a.token"},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
    }
    for scope in AUTHS:
        if scope.startswith("system/"):
            auth_headers[scope] = {"Authorization": f"Bearer {tokens.token(scope, ttl=3600)}"}
    first = server.client.get("/DiagnosticReport", params={"_count": 1}, headers=auth_headers["system/*.*"])
    assert first.status_code == 200, first.text
    cursors = [dict(parse_qsl(urlsplit(link["url"]).query))["_cursor"] for link in first.json()["link"]
               if link["relation"] == "next"]
    assert cursors
    running = Target(server, server.base.removesuffix("/fhir"), {k: sorted(v) for k, v in ids.items()}, binaries, cursors,
                     auth_headers)
    # A 5xx is reported by the test with its request. uvicorn's own "Exception in ASGI application" record, with its
    # traceback formatted in the server thread, leaves CPython 3.11.7's AST recursion bookkeeping off (python/cpython
    # #106905, fixed in 3.11.8): the next failure report then ends the whole session with an INTERNALERROR.
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.disabled = True
    try:
        yield running
    finally:
        uvicorn_errors.disabled = False
        running.client.close()
        server.close()
        database.dispose()


# ------------------------------------------------------------------------------------------ the checks


def check_response(method: str, url: str, status: int, content_type: str, body: bytes, *, request: str) -> None:
    """No 5xx; errors under /fhir are FHIR JSON OperationOutcomes; successes are JSON."""
    where = f"{request}\n-> {status} {content_type}\n{body[:2000]!r}"
    assert status < 500, where
    fhir = urlsplit(url).path.startswith("/fhir")
    if status >= 400:
        assert content_type.startswith("application/fhir+json" if fhir else "application/json"), where
        if method.upper() != "HEAD":  # no body to a HEAD
            outcome = json.loads(body)
            if fhir:
                OperationOutcome.model_validate(outcome)
        return
    if status in (204, 304) or method.upper() == "HEAD":
        assert not body, where
        return
    if 300 <= status < 400:
        return  # Starlette's redirect_slashes (a path ending in "/"): no body to check
    if urlsplit(url).path.startswith("/fhir/Binary/") and content_type.startswith("application/dicom"):
        return  # the file itself
    assert content_type.startswith(("application/json", "application/fhir+json")), where
    json.loads(body)


def check_bundle(body: dict[str, Any], where: str) -> None:
    """A searchset Bundle (R4B). ``_elements`` subsets are tagged SUBSETTED and may lack mandatory elements
    (R4 search §3.1.1.5.9): they are checked for their tag, the envelope without them."""
    entries = body.get("entry", [])
    subsets = [e for e in entries if any(t.get("code") == SUBSETTED for t in e["resource"].get("meta", {}).get("tag", []))]
    for entry in subsets:
        assert {"resourceType", "id", "meta"} <= set(entry["resource"]), where
    whole = [e for e in entries if e not in subsets]
    bundle = Bundle.model_validate({**body, "entry": whole} if whole else {k: v for k, v in body.items() if k != "entry"})
    assert bundle.type == "searchset", where


# ------------------------------------------------------------------------------------------ schemathesis

#: Fixed path parameter values, sent to every operation that has the parameter (all combinations).
EDGE_VALUES: dict[str, list[str]] = {
    "resource_type": ["DiagnosticReport", "Subscription", "Medication", "Binary"],
    "logical_id": [f"{BASE_UID}.0", f"{BASE_UID}.0.9901.1", "no-such-id", "x" * 300, "a\x00b", "\u2603"],
    "version_id": ["1", "0", "-1", "007", "1.0", " 1", "2147483648", "99999999999999999999999", "\u00b2", "\u0661"],
}


@pytest.fixture(scope="module")
def api_schema(target: Target) -> BaseSchema:
    config = SchemathesisConfig.from_dict({
        "seed": SEED,
        "generation": {"max-examples": OPERATION_EXAMPLES, "deterministic": True, "database": "none"},
        "dictionaries": {
            "types": {"values": [*RESOURCE_TYPES, *EDGE_VALUES["resource_type"], "metadata", "_search", "diagnosticreport"]},
            "ids": {"values": [*target.all_ids, *target.binaries, *EDGE_VALUES["logical_id"], "_history", "_search"]},
            "versions": {"values": EDGE_VALUES["version_id"]},
        },
        "parameters": {
            "path.resource_type": {"dictionary": "types", "probability": 0.8},
            "path.logical_id": {"dictionary": "ids", "probability": 0.6},
            "path.version_id": {"dictionary": "versions", "probability": 0.6},
        },
    })
    return schemathesis.openapi.from_url(f"{target.root}/openapi.json", config=config, timeout=10)


def _send_case(target: Target, case: Case, auth: str, accept: str | None, findings: list[str]) -> None:
    headers = target.headers(auth, accept)
    response = case.call(headers=headers, timeout=10)
    content_type = (response.headers.get("content-type") or [""])[0]
    try:
        check_response(case.method, response.request.url or "", response.status_code, content_type, response.content,
                       request=case.as_curl_command(headers=headers))
    except (AssertionError, ValueError) as exc:
        findings.append(f"{case.operation.label}: {exc}")


def _generated(target: Target, operation: APIOperation) -> list[str]:
    """One seeded Hypothesis run over *operation*'s generated cases; the failed checks, one text each."""
    findings: list[str] = []
    # No feedback: the constants schemathesis mines would come in hash order, a different set each run.
    cases = operation.as_strategy(feedback=FeedbackSources())

    @given(case=cases, auth=st.sampled_from(AUTHS), accept=st.sampled_from(ACCEPTS))
    @settings(max_examples=OPERATION_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def send(case: Case, auth: str, accept: str | None) -> None:
        _send_case(target, case, auth, accept, findings)

    send()
    return findings


def _edges(target: Target, operation: APIOperation) -> list[str]:
    """*operation* with every combination of :data:`EDGE_VALUES` for its path parameters, with a valid token."""
    findings: list[str] = []
    names = [p.name for p in operation.path_parameters]
    for values in itertools.product(*(EDGE_VALUES.get(name, ["x"]) for name in names)):
        _send_case(target, operation.Case(path_parameters=dict(zip(names, values, strict=True))), "system/*.*", None,
                   findings)
    return findings


def test_every_openapi_operation_answers_without_5xx(target: Target, api_schema: BaseSchema) -> None:
    labels: list[str] = []
    findings: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        findings += _generated(target, operation)
        findings += _edges(target, operation)
    assert {"GET /fhir/{resource_type}", "POST /fhir/{resource_type}/_search", "PUT /fhir/{resource_type}/{logical_id}",
            "GET /fhir/{resource_type}/{logical_id}/_history/{version_id}"} <= set(labels), labels
    distinct = list(dict.fromkeys(findings))
    assert not distinct, f"{len(distinct)} failed requests; the first ones:\n\n" + "\n\n".join(distinct[:8])


def test_openapi_document_is_available_and_valid(target: Target) -> None:
    response = httpx.get(f"{target.root}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["openapi"].startswith("3.")
    loaded = schemathesis.openapi.from_dict(document)
    loaded.validate()  # against the OpenAPI 3.x meta-schema
    labels = {result.ok().label for result in loaded.get_all_operations()}  # ok() raises on an invalid operation
    assert {"GET /fhir/metadata", "GET /fhir/{resource_type}", "GET /fhir/{resource_type}/{logical_id}"} <= labels


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PATCH", "TRACE", "PUT", "DELETE"])
@pytest.mark.parametrize("path", ["/fhir/metadata", "/fhir/DiagnosticReport", "/fhir/DiagnosticReport/_search",
                                  "/fhir/DiagnosticReport/x/_history", "/fhir/Subscription/x/_history/1", "/fhir/"])
def test_unlisted_methods_are_fhir_errors(target: Target, method: str, path: str) -> None:
    """What schemathesis's coverage phase would send: methods the OpenAPI does not list for a path."""
    response = httpx.request(method, target.root + path, headers=target.headers("system/*.*"), timeout=10)
    check_response(method, str(response.url), response.status_code, response.headers.get("content-type", ""),
                   response.content, request=f"{method} {path}")


# ------------------------------------------------------------------------------------------ search queries


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


#: Integers a database column or a page offset cannot hold, and their neighbours.
BOUNDARY_INTS = (0, 1, -1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63) - 1, -(2**70))
_junk = st.text(max_size=12)
_boundary = st.sampled_from(BOUNDARY_INTS)
_ints = st.one_of(st.integers(-5, 50), _boundary, st.integers())


def _dates() -> st.SearchStrategy[str]:
    """FHIR dates of every precision, some of them impossible (month 13, hour 25, year 0, zone +15:00)."""
    pieces = st.tuples(
        st.sampled_from([0, 1, 1970, 2026, 9999]).map(lambda y: f"{y:04d}") | st.integers(0, 99999).map(str),
        st.integers(0, 13), st.integers(0, 32), st.integers(0, 25), st.integers(0, 61), st.integers(0, 61),
        st.sampled_from(["", ".5", ".123456789", ".", ".x"]),
        st.sampled_from(["", "Z", "+01:00", "-14:00", "+15:00", "+14:60", " 01:00", "-00:00"]),
        st.integers(1, 6),
    )

    def build(p: tuple[str, int, int, int, int, int, str, str, int]) -> str:
        year, month, day, hour, minute, second, fraction, zone, precision = p
        parts = [year, f"-{month:02d}", f"-{day:02d}", f"T{hour:02d}:{minute:02d}", f":{second:02d}", fraction]
        return "".join(parts[:precision]) + (zone if precision >= 4 else "")

    return st.one_of(
        st.tuples(st.sampled_from([*DATE_PREFIXES, "", "", "xx", "EQ"]), st.builds(build, pieces)).map("".join),
        st.datetimes(timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-11))])).map(dt.datetime.isoformat),
        st.dates().map(dt.date.isoformat),
        _junk,
    )


def _tokens(target: Target) -> st.SearchStrategy[str]:
    code = st.sampled_from(["final", "18748-4", "PAT-001", "F", "female", "active", "CR", ""]) | st.text(max_size=8)
    system = st.sampled_from(["http://loinc.org", "1.2.3.4", "urn:oid:1.2.3.4", "", "a\\|b", "\\"]) | _junk
    ids = st.sampled_from(target.all_ids)
    return st.one_of(
        code, ids,
        st.tuples(system, code).map("|".join),
        st.tuples(system, code, code).map("|".join),
        st.lists(st.one_of(code, ids, st.tuples(system, code).map("|".join)), min_size=2, max_size=4).map(",".join),
        st.sampled_from(["\\", "a\\", "\\x", "\\,", "\\|", "\\\\", "|", "||", ",", ",,", "a,\\"]),
    )


def _references(target: Target) -> st.SearchStrategy[str]:
    known = st.sampled_from([f"{t}/{i}" for t, found in sorted(target.ids.items()) for i in found])
    return st.one_of(
        known,
        known.map(lambda ref: f"http://elsewhere.example/fhir/{ref}"),
        known.map(lambda ref: f"{ref}/_history/1"),
        st.sampled_from(target.all_ids),
        st.sampled_from(["Patient/", "/Patient/1", "Patient//1", "urn:uuid:x", "http:", "a/b/c", "Patient/1/_history",
                         "Patient/" + "9" * 300]),
        _junk,
    )


def _values(target: Target) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""), st.text(max_size=40), st.sampled_from(["true", "false", "TRUE", "1", "\x00", "a\x00b"]), _dates(),
        _tokens(target), _references(target), _ints.map(str), st.text(alphabet="\\|,$:", max_size=6),
    )


def _cursors(target: Target) -> st.SearchStrategy[str]:
    """Real cursors, well-formed ones with any numbers in them (``[as_of, offset, total]``), and garbage."""
    anything = st.one_of(_ints, st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=3))
    return st.one_of(
        st.sampled_from(target.cursors),
        st.tuples(_ints, _ints, st.none() | _ints).map(lambda t: _b64(list(t))),
        st.tuples(_boundary, _boundary, st.none() | _boundary).map(lambda t: _b64(list(t))),
        st.tuples(anything, anything, anything).map(lambda t: _b64(list(t))),
        st.recursive(st.none() | st.integers() | st.text(max_size=4), lambda inner: st.lists(inner, max_size=4)).map(_b64),
        st.binary(max_size=24).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        _junk,
    )


def _parameter(resource_type: str, target: Target) -> st.SearchStrategy[tuple[str, str]]:
    names = sorted(SEARCH_PARAMS[resource_type])
    everyone = sorted({name for params in SEARCH_PARAMS.values() for name in params})
    modifier = st.sampled_from(["", "", "", ":missing", ":not", ":exact", ":contains", ":text", ":Patient", ":above",
                                ":iterate", ":"]) | _junk.map(lambda m: ":" + m)
    name = st.one_of(st.sampled_from(names), st.sampled_from(everyone),
                     st.sampled_from(["_tag", "_has", "_type", "_filter", "subject.name", "patient.identifier"]), _junk)
    includes = st.tuples(
        st.sampled_from([*RESOURCE_TYPES, "Binary", ""]),
        st.sampled_from(sorted({*everyone, "*", ""})),
        st.sampled_from(["", "", ":Patient", ":Observation", ":ImagingStudy", ":Device", ":Nope", ":a:b"]),
    ).map(lambda t: f"{t[0]}:{t[1]}{t[2]}")
    sort_key = st.sampled_from(["_id", "_lastUpdated", "date", "started", "status", "", "-", "--date"])
    sorts = st.lists(st.tuples(st.sampled_from(["", "-"]), sort_key).map("".join), min_size=1, max_size=3).map(",".join)
    elements = st.lists(st.sampled_from(["status", "subject", "id", "meta", "code", "value[x]", "1x", "a.b", " "]) | _junk,
                        min_size=1, max_size=3).map(",".join)
    counts = st.one_of(_ints.map(str), st.sampled_from(["", "abc", "1e3", " 5", "5 ", "+5", "0x10", "\u0663", "0" * 40 + "1"]))
    return st.one_of(
        st.tuples(st.tuples(name, modifier).map("".join), _values(target)),
        st.tuples(st.sampled_from(["_include", "_revinclude", "_include:iterate"]), includes | _junk),
        st.tuples(st.just("_sort"), sorts | _junk),
        st.tuples(st.just("_count"), counts),
        st.tuples(st.just("_cursor"), _cursors(target)),
        st.tuples(st.just("_summary"), st.sampled_from(["count", "false", "true", "text", "data", "COUNT"]) | _junk),
        st.tuples(st.just("_total"), st.sampled_from(["none", "estimate", "accurate", "all"]) | _junk),
        st.tuples(st.just("_elements"), elements),
        st.tuples(st.sampled_from(["_format", "_pretty"]),
                  st.sampled_from(["json", "application/fhir+json", "xml", "true", "false", "html"]) | _junk),
    )


@dataclass(frozen=True)
class SearchRequest:
    method: str
    resource_type: str
    query: list[tuple[str, str]]
    form: list[tuple[str, str]]
    content_type: str | None
    auth: str
    strict: bool
    accept: str | None

    def describe(self) -> str:
        path = f"/fhir/{self.resource_type}" + ("/_search" if self.method == "POST" else "")
        text = f"{self.method} {path}?{urlencode(self.query)}  [auth={self.auth} strict={self.strict} accept={self.accept}]"
        if self.method == "POST":
            text += f"\nContent-Type: {self.content_type}\n\n{urlencode(self.form)}"
        return text


def search_requests(target: Target) -> st.SearchStrategy[SearchRequest]:
    """GET query strings and POST forms (some parameters in the query, the rest in the body), one type each."""
    parameters = {t: _parameter(t, target) for t in RESOURCE_TYPES}
    types = st.sampled_from(RESOURCE_TYPES) | st.sampled_from(["Binary", "Medication", "diagnosticreport"])
    content_types = st.sampled_from(["application/x-www-form-urlencoded", "application/x-www-form-urlencoded",
                                     "application/x-www-form-urlencoded; charset=utf-8", "application/json", None])

    @st.composite
    def build(draw: st.DrawFn) -> SearchRequest:
        resource_type = draw(types)
        params = draw(st.lists(parameters.get(resource_type, parameters["DiagnosticReport"]), max_size=6))
        method = draw(st.sampled_from(["GET", "POST"]))
        query, form, content_type = params, [], None
        if method == "POST":
            split = draw(st.integers(0, len(params)))
            query, form, content_type = params[:split], params[split:], draw(content_types)
        return SearchRequest(method, resource_type, query, form, content_type, draw(st.sampled_from(AUTHS)),
                             draw(st.booleans()), draw(st.sampled_from(ACCEPTS)))

    return build()


def send_search(target: Target, request: SearchRequest) -> httpx.Response:
    headers = target.headers(request.auth, request.accept, "handling=strict" if request.strict else None)
    if request.method == "GET":
        return target.client.get(f"/{request.resource_type}", params=request.query, headers=headers)
    if request.content_type is not None:
        headers["Content-Type"] = request.content_type
    return target.client.post(f"/{request.resource_type}/_search", params=request.query, content=urlencode(request.form),
                              headers=headers)


def check_search(request: SearchRequest, response: httpx.Response) -> None:
    check_response(request.method, str(response.url), response.status_code, response.headers.get("content-type", ""),
                   response.content, request=request.describe())
    if response.status_code == 200:
        check_bundle(response.json(), f"{request.describe()}\n-> {response.text[:2000]}")


@pytest.fixture(scope="module")
def searches(target: Target) -> st.SearchStrategy[SearchRequest]:
    return search_requests(target)  # built once: building it costs more than drawing from it


@given(data=st.data())
@settings(max_examples=SEARCH_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_generated_searches_answer_without_5xx(target: Target, searches: st.SearchStrategy[SearchRequest],
                                               data: st.DataObject) -> None:
    request = data.draw(searches)
    check_search(request, send_search(target, request))


#: Searches the generator finds only with luck (a seed that happens to combine them with an otherwise valid query):
#: kept as fixed cases so that they are sent on every run.
SEARCH_EDGES: list[tuple[str, list[tuple[str, str]]]] = [
    ("DiagnosticReport", [("_cursor", _b64([2**63, 0, None]))]),
    ("DiagnosticReport", [("_cursor", _b64([1, 2**63, None]))]),
    ("DiagnosticReport", [("_cursor", _b64([2**31, 0, 1]))]),
    ("DiagnosticReport", [("_cursor", _b64([1, 0, -1]))]),
    ("DiagnosticReport", [("_cursor", _b64([1, 0, 2**70]))]),
    ("DiagnosticReport", [("_count", "9" * 30)]),
    ("DiagnosticReport", [("status", "\x00")]),
    ("DiagnosticReport", [("_id", "a\x00b")]),
    ("Patient", [("name", "a\x00b")]),
    ("DiagnosticReport", [("date", "ap0001-01-01")]),
    ("DiagnosticReport", [("date", "9999-12-31T23:59:59-14:00")]),
    ("DiagnosticReport", [("_lastUpdated", "ap9999")]),
    ("DiagnosticReport", [("subject", "a" * 5000)]),
    ("DiagnosticReport", [("_include", "DiagnosticReport:subject"), ("_revinclude", "Observation:derived-from"),
                          ("_elements", "status"), ("_sort", "-date,_id")]),
]


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize(("resource_type", "params"), SEARCH_EDGES, ids=[urlencode(p)[:40] for _, p in SEARCH_EDGES])
def test_search_edge_values(target: Target, method: str, resource_type: str, params: list[tuple[str, str]]) -> None:
    form = params if method == "POST" else []
    request = SearchRequest(method, resource_type, [] if form else params, form,
                            "application/x-www-form-urlencoded" if form else None, "system/*.*", False, None)
    check_search(request, send_search(target, request))


@pytest.mark.parametrize("raw", [b"_count=%FF", b"\xff\xfe=1", b"status=final&" * 200, b"=&=&&", b"%", b"_cursor=%00"])
def test_odd_form_bodies(target: Target, raw: bytes) -> None:
    request = SearchRequest("POST", "DiagnosticReport", [], [], "application/x-www-form-urlencoded", "system/*.*", False, None)
    headers = {**target.headers("system/*.*"), "Content-Type": "application/x-www-form-urlencoded"}
    check_search(request, target.client.post("/DiagnosticReport/_search", content=raw, headers=headers))


# ------------------------------------------------------------------------------------------ Subscription writes

VALID_SUBSCRIPTION: dict[str, Any] = {
    "resourceType": "Subscription", "status": "requested", "reason": "results", "criteria": "DiagnosticReport?status=final",
    "channel": {"type": "rest-hook", "endpoint": "https://ehr.example/hook", "payload": "application/fhir+json"},
}
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5,
)
_ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True),
    st.sampled_from(["x" * 65, "a b", "\u00e9", "a:b", "a%b", "-", "_history", "_search"]),
    st.text(min_size=1, max_size=80).filter(lambda t: t not in (".", "..")),
)


@dataclass(frozen=True)
class WriteRequest:
    method: str
    logical_id: str
    content: bytes
    content_type: str | None
    auth: str

    @property
    def path(self) -> str:
        return "/Subscription" + ("" if self.method == "POST" else "/" + quote(self.logical_id, safe=""))

    def describe(self) -> str:
        return f"{self.method} /fhir{self.path}  [auth={self.auth}]\nContent-Type: {self.content_type}\n\n{self.content[:1500]!r}"


def subscription_writes(target: Target) -> st.SearchStrategy[WriteRequest]:
    """A valid Subscription with up to three fields replaced or removed, as a create, an update or a delete."""
    searches = _parameter("DiagnosticReport", target)
    fields: dict[str, st.SearchStrategy[Any]] = {
        "resourceType": st.sampled_from(["Subscription", "Patient", ""]),
        "id": _ids,
        "status": st.sampled_from(["requested", "active", "off", "error", "bogus"]),
        "reason": st.sampled_from(["", "  ", "results"]) | st.text(max_size=20),
        "criteria": st.one_of(
            st.sampled_from(["DiagnosticReport", "DiagnosticReport?", "?status=final", "Subscription?status=active",
                             "Binary?x=1", "DiagnosticReport?colour=blue", "diagnosticreport?status=final"]),
            st.tuples(st.sampled_from(RESOURCE_TYPES), st.lists(searches, max_size=3)).map(lambda t: f"{t[0]}?{urlencode(t[1])}"),
        ),
        "end": st.sampled_from(["2030-01-01T00:00:00Z", "2030-01-01T00:00:00+01:00", "2020-01-01T00:00:00Z", "2030-01-01",
                                "2030-01-01T00:00Z", "9999-12-31T23:59:59-14:00", "tomorrow"]) | _dates(),
        "channel.type": st.sampled_from(["rest-hook", "email", "websocket"]),
        "channel.endpoint": st.sampled_from(["https://ehr.example/hook", "http://10.0.0.1:8080/x", "ftp://ehr.example/",
                                             "https://", "//ehr.example", "hook", "https://ehr.example/a?b=c#d"]) | _junk,
        "channel.payload": st.sampled_from(["application/fhir+json", "application/json", "application/fhir+xml", ""]),
        "channel.header": st.lists(st.sampled_from(["Authorization: Bearer x", "X: y", "no colon"]) | _junk, max_size=3),
    }
    keys = sorted(fields)
    removed = object()

    @st.composite
    def build(draw: st.DrawFn) -> WriteRequest:
        body: dict[str, Any] = {**VALID_SUBSCRIPTION, "channel": dict(VALID_SUBSCRIPTION["channel"])}
        for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
            value = draw(st.one_of(fields[key], fields[key], _json, st.just(removed)))
            holder, name = (body["channel"], key[8:]) if key.startswith("channel.") else (body, key)
            if not isinstance(holder, dict):
                continue
            if value is removed:
                holder.pop(name, None)
            else:
                holder[name] = value
        method = draw(st.sampled_from(["POST", "PUT", "PUT", "DELETE"]))
        logical_id = draw(_ids)
        if method == "PUT" and "id" not in body:
            body["id"] = logical_id
        content = draw(st.one_of(st.just(json.dumps(body).encode()), st.just(json.dumps(body).encode()),
                                 st.sampled_from([b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"resourceType": "Subscription"}'])))
        content_type = draw(st.sampled_from(["application/fhir+json", "application/fhir+json", "application/json",
                                             "application/fhir+json; charset=utf-8", "text/plain", None]))
        auth = draw(st.sampled_from(["system/*.cruds", "system/*.cruds", "system/*.*", "system/*.read", "no token"]))
        return WriteRequest(method, logical_id, content, content_type, auth)

    return build()


def check_write(request: WriteRequest, response: httpx.Response) -> None:
    where = f"{request.describe()}\n-> {response.status_code} {response.text[:1500]}"
    check_response(request.method, str(response.url), response.status_code, response.headers.get("content-type", ""),
                   response.content, request=request.describe())
    if response.status_code in (200, 201):
        served = Subscription.model_validate(response.json())
        assert served.id is not None and FHIR_ID.fullmatch(served.id), where
        assert served.status in ("active", "off"), where
        if request.method == "PUT":
            assert served.id == request.logical_id, where


@pytest.fixture(scope="module")
def writes(target: Target) -> st.SearchStrategy[WriteRequest]:
    return subscription_writes(target)


@given(data=st.data())
@settings(max_examples=WRITE_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_generated_subscription_writes_answer_without_5xx(target: Target, writes: st.SearchStrategy[WriteRequest],
                                                          data: st.DataObject) -> None:
    request = data.draw(writes)
    headers = target.headers(request.auth)
    if request.content_type is not None:
        headers["Content-Type"] = request.content_type
    response = target.client.request(request.method, request.path, content=request.content or None, headers=headers)
    check_write(request, response)


#: Writes the generator reaches only now and then (see :data:`SEARCH_EDGES`): (method, id, fields over a valid body).
WRITE_EDGES: list[tuple[str, str, dict[str, Any]]] = [
    ("PUT", "sub-1", {}),
    ("PUT", "a b", {}),
    ("PUT", "x" * 65, {}),
    ("PUT", "\u2603", {}),
    ("PUT", "_search", {}),
    ("POST", "", {"end": "2030-01-01T00:00Z"}),
    ("POST", "", {"end": "9999-12-31T23:59:59-14:00"}),
    ("POST", "", {"criteria": "DiagnosticReport?_cursor=" + _b64([2**63, 0, None])}),
    ("POST", "", {"criteria": "DiagnosticReport?status=\x00"}),
    ("POST", "", {"channel": {**VALID_SUBSCRIPTION["channel"], "endpoint": "https://ehr.example/a\x00b"}}),
]


@pytest.mark.parametrize(("method", "logical_id", "fields"), WRITE_EDGES,
                         ids=[f"{m} {i[:10]!r} {sorted(f)}" for m, i, f in WRITE_EDGES])
def test_subscription_write_edge_values(target: Target, method: str, logical_id: str, fields: dict[str, Any]) -> None:
    body = {**VALID_SUBSCRIPTION, **fields, **({"id": logical_id} if method == "PUT" else {})}
    request = WriteRequest(method, logical_id, json.dumps(body).encode(), "application/fhir+json", "system/*.cruds")
    headers = {**target.headers(request.auth), "Content-Type": "application/fhir+json"}
    check_write(request, target.client.request(method, request.path, content=request.content, headers=headers))
