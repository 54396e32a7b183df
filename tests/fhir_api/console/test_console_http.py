"""The console over real HTTP (fhir_api.console.app): an in-process gateway on real sockets that
received a real chest radiograph over DICOM, analysed it and dead-lettered its reports; a real
HTTP client (httpx) signs in with the development sign-in and walks the pages.

Covers: sign-in redirects, the development sign-in (loopback only, ``next`` only inside the
console), the security headers of every response, CSRF, sign-out, the read-only role, filter
errors as 400 pages, the audit records of views and searches, and the PNG/SR/report downloads.
"""

from __future__ import annotations

import html
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from audit.models import AuditRecord
from conf.errors import InvalidInputError
from inference.manifest import BUNDLED_MODEL_DIR
from tests.conftest import copy_with_new_uids, free_port, make_settings, sample, wait_until
from tests.dicom_node.test_storage_scp import send
from tests.fhir_api.console.conftest import running_gateway
from tests.fhir_api.tokens import TokenService
from tests.inference.tiny_model import write_model_dir

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Study:
    def __init__(self, gateway: Any, uid: str, sop_uid: str, patient_id: str) -> None:
        self.gateway = gateway
        self.uid = uid
        self.sop_uid = sop_uid
        self.patient_id = patient_id
        self.base = f"http://127.0.0.1:{gateway.http.port}"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """A gateway (development sign-in on, workers on, its PACS unreachable) with one analysed
    radiograph whose SR and summary image are dead letters and whose FHIR report is projected."""
    tmp = tmp_path_factory.mktemp("console-http")
    tokens = TokenService(tmp / "idp")
    # The bundled model when it has been exported, else the small contract test model.
    model = BUNDLED_MODEL_DIR if (BUNDLED_MODEL_DIR / "model.json").is_file() else write_model_dir(tmp / "model")
    sections = {
        "inference": {"model_dir": str(model)},
        "console": {"dev_login": True, "page_size": 10},
        "fhir": {"auth": tokens.auth_settings()},
        "worker": {"enabled": True, "poll_interval": 0.1},
        "results": {"study_stable_seconds": 0.2},
        "delivery": {"max_attempts": 1, "timeout_seconds": 2},
    }
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    with running_gateway(tmp, sections, destinations=[destination]) as gateway:
        path = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp / "in")
        source = pydicom.dcmread(path, stop_before_pixels=True)
        assert send(gateway, path, calling="STORESCU") == [0]
        found = Study(gateway, str(source.StudyInstanceUID), str(source.SOPInstanceUID), str(source.PatientID))
        with _signed_in(found, "setup", "operate") as client:
            wait_until(lambda: client.get(f"/console/studies/{found.uid}/report").status_code == 200, 60, "the FHIR report")
            wait_until(lambda: len(_retry_buttons(client)) >= 2, 60, "the SR and the summary image dead-lettered")
            wait_until(lambda: "sr.dcm" in client.get(f"/console/studies/{found.uid}").text, 60, "the SR link")
        yield found


def _client(study: Study) -> httpx.Client:
    return httpx.Client(base_url=study.base, timeout=20, follow_redirects=False)


def _login(client: httpx.Client, name: str, role: str, next_url: str = "/console/") -> httpx.Response:
    return client.post("/console/login", data={"name": name, "role": role, "next": next_url})


class _signed_in:  # noqa: N801 - used as a context manager
    def __init__(self, study: Study, name: str, role: str) -> None:
        self.client = _client(study)
        response = _login(self.client, name, role)
        assert response.status_code == 303, response.text

    def __enter__(self) -> httpx.Client:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()


@pytest.fixture
def operator(study: Study) -> Iterator[httpx.Client]:
    with _signed_in(study, "alice", "operate") as client:
        yield client


@pytest.fixture
def reader(study: Study) -> Iterator[httpx.Client]:
    with _signed_in(study, "rita", "read") as client:
        yield client


def _csrf(client: httpx.Client, page: str = "/console/audit") -> str:
    found = CSRF.search(client.get(page).text)
    assert found, "no CSRF token on the page"
    return found.group(1)


def _pages(study: Study) -> list[str]:
    uid = study.uid
    return [
        "/console/", "/console/studies", f"/console/studies/{uid}", f"/console/studies/{uid}/summary.png",
        f"/console/studies/{uid}/images/{study.sop_uid}.png", f"/console/studies/{uid}/sr.dcm",
        f"/console/studies/{uid}/report", "/console/outbox", "/console/outbox/1", "/console/audit",
        "/console/audit/export", "/console/model",
    ]


def _audit(gateway: Any, event_id: str) -> list[tuple[int, dict[str, Any]]]:
    with gateway.runtime.database.read_session() as session:
        rows = session.execute(select(AuditRecord).where(AuditRecord.event_id == event_id).order_by(AuditRecord.seq)).scalars()
        return [(int(row.outcome), row.event) for row in rows]


def _requestor(event: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in event["participants"] if p.get("user_is_requestor"))


def _retry_buttons(client: httpx.Client) -> list[str]:
    return re.findall(r'action="/console/outbox/(\d+)/retry"', client.get("/console/outbox?state=failed").text)


# ------------------------------------------------------------------------------ signing in


def test_every_page_without_a_session_redirects_to_sign_in(study: Study) -> None:
    with _client(study) as client:
        for page in _pages(study):
            response = client.get(page)
            assert response.status_code == 303, page
            assert response.headers["location"] == f"/console/login?next={quote(page, safe='')}", page
        assert client.get("/console").headers["location"] == "/console/"
        assert client.get("/console/login").status_code == 200


@pytest.mark.parametrize("page", ["/console/logout", "/console/outbox/1/retry", "/console/audit/verify"])
def test_a_post_without_a_session_is_refused(study: Study, page: str) -> None:
    with _client(study) as client:
        response = client.post(page, data={"csrf_token": "x"})
    assert response.status_code == 401
    assert "sign in first" in response.text and "text/html" in response.headers["content-type"]


def test_development_sign_in_from_loopback(study: Study) -> None:
    with _client(study) as client:
        assert 'action="/console/login"' in client.get("/console/login").text
        response = _login(client, "dora", "operate", "/console/outbox?state=failed")
        assert response.status_code == 303 and response.headers["location"] == "/console/outbox?state=failed"
        page = client.get("/console/")
        assert page.status_code == 200 and "dora" in page.text and "(operator)" in page.text


@pytest.mark.parametrize(("name", "role"), [("", "operate"), ("eve", "admin"), ("eve", "")])
def test_development_sign_in_needs_a_name_and_a_role(study: Study, name: str, role: str) -> None:
    with _client(study) as client:
        response = _login(client, name, role)
        assert response.status_code == 400
        assert client.get("/console/").status_code == 303


@pytest.mark.parametrize("target", ["https://evil.example", "//evil.example", "/fhir/metadata", "/console\\@evil.example",
                                    "///evil.example", "javascript:alert(1)", "", "/console/../fhir/metadata",
                                    "/console/%2e%2e/fhir/metadata", "/console/./../health"])
def test_next_is_only_followed_inside_the_console(study: Study, target: str) -> None:
    with _client(study) as client:
        response = _login(client, "mallory", "read", target)
        assert response.status_code == 303 and response.headers["location"] == "/console/"
        login = client.get(f"/console/login?next={quote(target, safe='')}")
        assert 'name="next" value="/console/"' in login.text


def test_development_sign_in_with_a_public_bind_is_refused_at_start(tmp_path: Path) -> None:
    from gateway.app import Gateway, open_runtime

    tokens = TokenService(tmp_path / "idp")
    settings = make_settings(tmp_path, None, {"console": {"dev_login": True},
                                              "fhir": {"port": 0, "bind": "0.0.0.0", "auth": tokens.auth_settings()}})  # noqa: S104
    runtime = open_runtime(settings)
    try:
        with pytest.raises(InvalidInputError, match="dev_login needs a loopback"):
            gateway = Gateway(runtime)
            gateway.start()
            gateway.stop()
    finally:
        runtime.close()


def test_sign_out_revokes_the_cookie(study: Study) -> None:
    with _signed_in(study, "olga", "operate") as client:
        old = client.cookies.get("pneumo_console")
        assert old
        response = client.post("/console/logout", data={"csrf_token": _csrf(client, "/console/")})
        assert response.status_code == 303 and response.headers["location"] == "/console/login?done=signed-out"
        assert "You are signed out." in client.get(response.headers["location"]).text
    with _client(study) as replay:
        replay.cookies.set("pneumo_console", old, domain="127.0.0.1", path="/console")
        response = replay.get("/console/")
        assert response.status_code == 303 and response.headers["location"].startswith("/console/login")
    events = wait_until(lambda: [e for o, e in _audit(study.gateway, "110114") if "signed out" in e.get("outcome_description", "")
                                 and _requestor(e).get("user_name") == "olga"], 10, "the sign-out record")
    assert events


# ------------------------------------------------------------------------------ headers


def _assert_secure_headers(response: httpx.Response, *, cacheable: bool = False) -> None:
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"
    assert len(headers.get_list("cache-control")) == 1
    if cacheable:
        assert "no-store" not in headers["cache-control"] and "max-age" in headers["cache-control"]
    else:
        assert headers["cache-control"] == "no-store"


def test_every_console_response_has_the_security_headers(study: Study, operator: httpx.Client) -> None:
    with _client(study) as anonymous:
        for page in [*_pages(study), "/console/login"]:
            _assert_secure_headers(anonymous.get(page))
        _assert_secure_headers(anonymous.post("/console/audit/verify"))
    for page in _pages(study):
        response = operator.get(page)
        assert response.status_code == 200 or page == "/console/outbox/1", (page, response.status_code)
        _assert_secure_headers(response)
    for page in ("/console/studies/1.2.3.4", "/console/studies?from=notadate", "/console/nowhere"):
        _assert_secure_headers(operator.get(page))
    css = operator.get("/console/static/console.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]
    _assert_secure_headers(css, cacheable=True)
    assert "content-security-policy" not in operator.get("/fhir/metadata").headers  # only the console's


def test_session_cookie_attributes(study: Study) -> None:
    with _client(study) as client:
        cookie = _login(client, "carl", "read").headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=" in cookie and "path=/console" in cookie and "max-age=" in cookie


# ------------------------------------------------------------------------------ CSRF


def test_csrf_is_checked_on_posts(study: Study, operator: httpx.Client) -> None:
    token = _csrf(operator)
    refused = [
        {"data": {}},
        {"data": {"csrf_token": "wrong"}},
        {"data": {"csrf_token": token[:-2] + "AA"}},
        {"data": {"csrf_token": token}, "headers": {"Origin": "https://evil.example"}},
        {"data": {"csrf_token": token}, "headers": {"Origin": "null"}},
        {"data": {"csrf_token": token}, "headers": {"Sec-Fetch-Site": "cross-site"}},
        {"data": {"csrf_token": token}, "headers": {"Sec-Fetch-Site": "same-site"}},
    ]
    for case in refused:
        response = operator.post("/console/audit/verify", **case)
        assert response.status_code == 403, case
        assert "Chain intact" not in response.text
    with _signed_in(study, "bob", "operate") as other:  # another session's token
        assert operator.post("/console/audit/verify", data={"csrf_token": _csrf(other)}).status_code == 403
    ok = operator.post("/console/audit/verify", data={"csrf_token": token},
                       headers={"Origin": study.base, "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 200 and "Chain intact" in ok.text


def test_dev_login_refuses_a_foreign_origin(study: Study) -> None:
    with _client(study) as client:
        response = client.post("/console/login", data={"name": "x", "role": "operate"}, headers={"Origin": "https://evil.example"})
        assert response.status_code == 403
        assert client.get("/console/").status_code == 303


# ------------------------------------------------------------------------------ roles


def test_read_only_role_cannot_retry_nor_export(study: Study, operator: httpx.Client, reader: httpx.Client) -> None:
    failed = wait_until(lambda: _retry_buttons(operator), 30, "a retry button for the operator")
    assert ">Retry<" not in reader.get("/console/outbox?state=failed").text
    assert ">Retry<" not in reader.get(f"/console/outbox/{failed[0]}").text
    response = reader.post(f"/console/outbox/{failed[0]}/retry", data={"csrf_token": _csrf(reader)})
    assert response.status_code == 403 and "operator role" in response.text
    assert reader.get("/console/audit/export?format=fhir").status_code == 403
    assert reader.get("/console/audit").status_code == 200  # but may read it


def test_operator_retries_a_dead_letter_and_exports_the_audit_log(study: Study, operator: httpx.Client) -> None:
    failed = wait_until(lambda: _retry_buttons(operator), 30, "a dead letter")
    job = failed[0]
    response = operator.post(f"/console/outbox/{job}/retry", data={"csrf_token": _csrf(operator), "next": "/console/outbox"})
    assert response.status_code == 303
    assert response.headers["location"] == f"/console/outbox?done=retried&job={job}"
    assert f"Delivery {job} re-queued" in operator.get(response.headers["location"]).text
    exported = operator.get("/console/audit/export?format=fhir")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("application/x-ndjson")
    assert exported.headers["cache-control"] == "no-store"
    lines = [json.loads(line) for line in exported.text.splitlines() if line.strip()]
    assert lines and all(line["resourceType"] == "AuditEvent" for line in lines)
    assert operator.get("/console/audit/export?format=bogus").status_code == 400


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "page",
    ["/console/studies?from=notadate", "/console/studies?to=2026-13-01", "/console/studies?result=bogus",
     "/console/studies?delivery=bogus", "/console/outbox?after=x", "/console/outbox?state=bogus",
     "/console/audit?action=999", "/console/audit?from=yesterday", "/console/audit?before=-1",
     "/console/audit/export?from=nope",
     # the day after the last date is no date; ids beyond the database's integers; a Unicode digit
     "/console/studies?to=9999-12-31", "/console/audit?from=9999-12-31", "/console/audit?to=9999-12-31",
     "/console/audit/export?from=2026-01-01&to=9999-12-31", "/console/outbox?after=99999999999999999999999",
     "/console/audit?before=99999999999999999999999", "/console/outbox?after=%C2%B2", "/console/audit?before=%C2%B2",
     "/console/studies?after=not-a-cursor"],
)
def test_bad_filter_values_are_a_400_page(operator: httpx.Client, page: str) -> None:
    response = operator.get(page)
    assert response.status_code == 400, response.text
    assert "text/html" in response.headers["content-type"] and 'role="alert"' in response.text


@pytest.mark.parametrize(
    "page",
    ["/console/studies/1.2.3.4.5", "/console/studies/1.2.3.4.5/summary.png", "/console/studies/1.2.3.4.5/sr.dcm",
     "/console/studies/1.2.3.4.5/report", "/console/outbox/999999", "/console/outbox/0",
     "/console/outbox/99999999999999999999999", "/console/outbox/abc", "/console/outbox/%C2%B2"],
)
def test_unknown_things_are_a_404_page(operator: httpx.Client, page: str) -> None:
    response = operator.get(page)
    assert response.status_code == 404
    assert "text/html" in response.headers["content-type"] and 'role="alert"' in response.text


def test_retry_of_a_delivery_that_cannot_exist_is_not_found(operator: httpx.Client) -> None:
    response = operator.post("/console/outbox/99999999999999999999999/retry", data={"csrf_token": _csrf(operator)})
    assert response.status_code == 404


def test_the_read_only_role_may_verify_the_chain(reader: httpx.Client) -> None:
    """docs/console.md: verifying changes nothing, so a read-only user may run it (export is the operator's)."""
    response = reader.post("/console/audit/verify", data={"csrf_token": _csrf(reader)})
    assert response.status_code == 200 and "Chain intact" in response.text


def test_a_users_name_is_escaped(study: Study) -> None:
    with _signed_in(study, "<script>alert(1)</script>", "read") as client:
        page = client.get("/console/")
    assert page.status_code == 200 and "<script>alert(1)" not in page.text and "&lt;script&gt;alert(1)" in page.text


def test_an_image_of_another_study_is_not_found(study: Study, operator: httpx.Client) -> None:
    assert operator.get(f"/console/studies/{study.uid}/images/1.2.3.4.png").status_code == 404


def test_the_filters_escape_what_they_echo(operator: httpx.Client) -> None:
    response = operator.get("/console/studies?q=%3Cscript%3Ealert(1)%3C/script%3E")
    assert response.status_code == 200 and "<script>alert" not in response.text


# ------------------------------------------------------------------------------ pages and audit


def test_pages_render_for_an_operator(study: Study, operator: httpx.Client) -> None:
    overview = operator.get("/console/")
    assert overview.status_code == 200 and "<svg" in overview.text
    studies = operator.get("/console/studies")
    assert studies.status_code == 200 and study.uid in studies.text
    assert study.uid in operator.get(f"/console/studies?q={study.patient_id}").text
    assert study.uid not in operator.get("/console/studies?q=nobody-by-this-name").text
    model = operator.get("/console/model")
    assert model.status_code == 200
    audit = operator.get("/console/audit?action=110104")
    assert audit.status_code == 200 and "DICOM Instances Transferred" in audit.text


def test_the_study_page_view_is_audited_as_a_patient_record(study: Study) -> None:
    with _signed_in(study, "petra", "read") as client:
        page = client.get(f"/console/studies/{study.uid}")
    assert page.status_code == 200 and study.patient_id in page.text and "summary.png" in page.text

    def viewed() -> list[dict[str, Any]]:
        return [e for _, e in _audit(study.gateway, "110110")
                if _requestor(e).get("user_name") == "petra" and "opened the study page" in e.get("outcome_description", "")]

    [event] = wait_until(viewed, 10, "the Patient Record audit record")
    assert _requestor(event)["user_id"] == "dev:petra"
    assert event["action"] == "R"
    ids = {o["object_id"] for o in event["objects"]}
    assert study.uid in ids and study.patient_id in ids


def test_the_studies_list_is_audited_as_a_query(study: Study) -> None:
    with _signed_in(study, "quinn", "read") as client:
        assert client.get("/console/studies?modality=CR").status_code == 200

    def listed() -> list[dict[str, Any]]:
        return [e for _, e in _audit(study.gateway, "110112") if _requestor(e).get("user_name") == "quinn"]

    [event] = wait_until(listed, 10, "the Query audit record")
    assert event["outcome_description"] == "console: studies list"
    assert study.patient_id in {o["object_id"] for o in event["objects"]}


def test_summary_image_and_thumbnail_are_png(study: Study, operator: httpx.Client) -> None:
    page = operator.get(f"/console/studies/{study.uid}").text
    assert f"/console/studies/{study.uid}/images/{study.sop_uid}.png" in page
    for url, largest in ((f"/console/studies/{study.uid}/summary.png", 1024),
                         (f"/console/studies/{study.uid}/images/{study.sop_uid}.png", 256)):
        response = operator.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.headers["cache-control"] == "no-store"
        image = Image.open(io.BytesIO(response.content))
        image.verify()
        assert image.format == "PNG" and max(image.size) <= largest and min(image.size) > 16


def test_sr_download_is_a_dicom_sr(study: Study, operator: httpx.Client) -> None:
    response = operator.get(f"/console/studies/{study.uid}/sr.dcm")
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    assert response.headers["cache-control"] == "no-store"
    assert "attachment" in response.headers["content-disposition"]
    sr = pydicom.dcmread(io.BytesIO(response.content))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == study.uid


def test_report_page_shows_the_diagnostic_report(study: Study, operator: httpx.Client) -> None:
    response = operator.get(f"/console/studies/{study.uid}/report")
    assert response.status_code == 200
    found = re.search(r"<pre[^>]*>(.*?)</pre>", response.text, re.S)
    assert found
    report = json.loads(html.unescape(found.group(1)))
    assert report["resourceType"] == "DiagnosticReport"
    assert report["imagingStudy"][0]["reference"] == f"ImagingStudy/{study.uid}"


def test_verify_names_the_first_broken_record(tmp_path: Path) -> None:
    """An edited audit record (the append-only guards lifted first, as an attacker with the owner's
    rights would) is found by "Verify chain" on the page, which names the record."""
    from sqlalchemy import text

    from tests.audit.attacker import drop_guards_on

    with running_gateway(tmp_path, {"console": {"dev_login": True}}) as gateway:
        client = httpx.Client(base_url=f"http://127.0.0.1:{gateway.http.port}", timeout=30)
        _login(client, "auditor", "operate")
        gateway.audit_trail.flush()
        engine = gateway.runtime.database.engine
        drop_guards_on(engine)
        with engine.begin() as connection:
            victim = connection.execute(text("SELECT min(seq) FROM audit_record")).scalar_one()
            connection.execute(text("UPDATE audit_record SET outcome = 8 WHERE seq = :seq"), {"seq": victim})
        response = client.post("/console/audit/verify", data={"csrf_token": _csrf(client)})
        assert response.status_code == 200
        status = re.search(r'role="status">([^<]+)', response.text)
        assert status is not None and f"Chain broken at record {victim}" in status.group(1), status


def test_behind_a_proxy_the_public_origin_is_the_one_expected(tmp_path: Path) -> None:
    """With ``[fhir] base_url`` (TLS terminated by a reverse proxy) a form is accepted from the public
    origin the browser sees, and refused from the internal address it was forwarded to."""
    sections = {"console": {"dev_login": True}, "fhir": {"base_url": "https://pneumo.hospital.example/fhir"}}
    with running_gateway(tmp_path, sections) as gateway:
        client = httpx.Client(base_url=f"http://127.0.0.1:{gateway.http.port}", timeout=30)
        refused = client.post("/console/login", data={"name": "ada", "role": "read"},
                              headers={"Origin": f"http://127.0.0.1:{gateway.http.port}"})
        assert refused.status_code == 403
        accepted = client.post("/console/login", data={"name": "ada", "role": "read"},
                               headers={"Origin": "https://pneumo.hospital.example"})
        assert accepted.status_code == 303


def test_a_notice_names_only_a_delivery_number(operator: httpx.Client) -> None:
    """The status line after a retry is built from the query string: it must not carry other text."""
    page = operator.get("/console/outbox", params={"done": "retried", "job": "1 has been hacked; call 555"})
    assert "hacked" not in page.text
    assert "re-queued" in operator.get("/console/outbox", params={"done": "retried", "job": "42"}).text
