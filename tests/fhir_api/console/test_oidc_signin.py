"""Signing in to the console with OpenID Connect (fhir_api.console.oidc and the /console/auth
routes): the authorization code flow with PKCE against a real authorization server on a real
socket, real RS256 access tokens (tests/fhir_api/tokens.py), and a browser played by httpx that
follows each redirect by hand and carries its cookies."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from sqlalchemy import select

from audit.models import AuditRecord
from conf.errors import AuthenticationError, UnavailableError
from conf.settings import ConsoleOidcSettings
from fhir_api.console import oidc
from storage import jobs
from storage.job_kinds import DELIVER_JOB
from storage.models import Job, JobState
from tests.conftest import free_port, wait_until
from tests.fhir_api.console.conftest import running_gateway
from tests.fhir_api.tokens import TokenService

CLIENT_ID = "console"
OPERATE = "openid pneumo/console.operate"
READ = "openid pneumo/console.read"


@dataclass
class _Grant:
    challenge: str
    method: str
    redirect_uri: str
    client_id: str


@dataclass
class IdentityProvider:
    """A small OAuth 2.0 authorization server: /authorize hands out one-time codes bound to the
    PKCE challenge, /token redeems them (RFC 6749 §4.1, RFC 7636 S256)."""

    tokens: TokenService
    issue: Callable[[], str] = field(default=lambda: "")
    error: str | None = None  # /authorize answers with this error instead of a code
    grants: dict[str, _Grant] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    def reset(self) -> None:
        self.issue = lambda: self.tokens.token(scope=OPERATE, client_id=CLIENT_ID, sub="jdoe", name="Jane Doe")
        self.error = None
        self.refusals.clear()

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def authorize(self, query: dict[str, str]) -> str:
        target = query["redirect_uri"]
        if self.error:
            answer = {"error": self.error, "error_description": "<script>alert(1)</script>", "state": query.get("state", "")}
        elif query.get("response_type") != "code" or query.get("code_challenge_method") != "S256":
            answer = {"error": "invalid_request", "state": query.get("state", "")}
        else:
            code = secrets.token_urlsafe(16)
            self.grants[code] = _Grant(query["code_challenge"], query["code_challenge_method"], target, query["client_id"])
            answer = {"code": code, "state": query["state"]}
        return f"{target}{'&' if '?' in target else '?'}{urlencode(answer)}"

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        grant = self.grants.pop(form.get("code", ""), None)  # one use only
        verifier = form.get("code_verifier", "")
        problem = None
        if form.get("grant_type") != "authorization_code":
            problem = "grant_type"
        elif grant is None:
            problem = "code"
        elif form.get("redirect_uri") != grant.redirect_uri:
            problem = "redirect_uri"
        elif form.get("client_id") != CLIENT_ID or grant.client_id != CLIENT_ID:
            problem = "client_id"
        elif not 43 <= len(verifier) <= 128:
            problem = "verifier length"
        elif base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode() != grant.challenge:
            problem = "pkce"
        if problem:
            self.refusals.append(problem)
            return 400, {"error": "invalid_grant", "error_description": problem}
        return 200, {"access_token": self.issue(), "token_type": "Bearer", "expires_in": 300}

    def start(self) -> IdentityProvider:
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                if url.path != "/authorize":
                    self.send_error(404)
                    return
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                self.send_response(302)
                self.send_header("Location", idp.authorize(query))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:  # noqa: N802
                if self.path != "/token" or self.headers.get("Content-Type") != "application/x-www-form-urlencoded":
                    self.send_error(404)
                    return
                raw = self.rfile.read(int(self.headers["Content-Length"])).decode("ascii")
                status, body = idp.token({k: v[0] for k, v in parse_qs(raw).items()})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Setup:
    gateway: Any
    idp: IdentityProvider
    dead_letter: int  # a failed delivery (an operator would see its Retry button)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http.port}"


@pytest.fixture(scope="module")
def oidc_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp: Path = tmp_path_factory.mktemp("console-oidc")
    tokens = TokenService(tmp / "idp")
    idp = IdentityProvider(tokens).start()
    sections = {
        "console": {"oidc": {"authorization_endpoint": f"{idp.base}/authorize", "token_endpoint": f"{idp.base}/token",
                             "client_id": CLIENT_ID}},
        "fhir": {"auth": tokens.auth_settings()},
    }
    try:
        with running_gateway(tmp, sections) as gateway:
            yield Setup(gateway, idp, _dead_letter(gateway))
    finally:
        idp.stop()


def _dead_letter(gateway: Any) -> int:
    """A dead-lettered HL7 delivery (the workers are off: it stays one)."""
    with gateway.runtime.database.session() as session:
        jobs.enqueue(session, DELIVER_JOB, "deliver:hl7:ehr:console-test",
                     payload={"channel": "hl7", "destination": "ehr", "subject": "console-test"})
        job = session.execute(select(Job).where(Job.dedup_key == "deliver:hl7:ehr:console-test")).scalar_one()
        job.state = JobState.FAILED
        job.attempts = 1
        job.last_error = "refused"
        return int(job.id)


def _job_state(env: Setup) -> str:
    with env.gateway.runtime.database.read_session() as session:
        return str(session.execute(select(Job.state).where(Job.id == env.dead_letter)).scalar_one())


@pytest.fixture
def env(oidc_gateway: Setup) -> Setup:
    oidc_gateway.idp.reset()
    return oidc_gateway


def _browser() -> httpx.Client:
    return httpx.Client(timeout=20, follow_redirects=False)


def _to_idp(env: Setup, browser: httpx.Client, next_url: str = "/console/") -> str:
    """/console/auth/start: the redirect to the IdP (and the pending sign-in's cookie)."""
    start = browser.get(f"{env.base}/console/auth/start", params={"next": next_url})
    assert start.status_code == 303, start.text
    location = start.headers["location"]
    assert location.startswith(f"{env.idp.base}/authorize?")
    return location


def _from_idp(env: Setup, browser: httpx.Client, authorize_url: str) -> str:
    """The IdP's redirect back to the console's callback."""
    answer = browser.get(authorize_url)
    assert answer.status_code == 302
    callback = answer.headers["location"]
    assert callback.startswith(f"{env.base}/console/auth/callback?")
    return callback


def _sign_in(env: Setup, browser: httpx.Client, next_url: str = "/console/") -> httpx.Response:
    return browser.get(_from_idp(env, browser, _to_idp(env, browser, next_url)))


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def _auth_records(env: Setup) -> list[tuple[int, dict[str, Any]]]:
    with env.gateway.runtime.database.read_session() as session:
        rows = session.execute(select(AuditRecord).where(AuditRecord.event_id == "110114").order_by(AuditRecord.seq)).scalars()
        return [(int(r.outcome), r.event) for r in rows]


def _refused(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert words in response.text
    assert "pneumo_console=" not in response.headers.get("set-cookie", "")


def test_the_authorization_request(env: Setup) -> None:
    with _browser() as browser:
        login = browser.get(f"{env.base}/console/login?next=/console/outbox")
        assert 'href="/console/auth/start?next=/console/outbox"' in login.text
        assert 'action="/console/login"' not in login.text  # no development sign-in here
        url = _to_idp(env, browser, "/console/outbox")
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert query["response_type"] == "code" and query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == f"{env.base}/console/auth/callback"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert len(query["state"]) >= 32 and query["nonce"]
    assert set(query["scope"].split()) == {"openid", "pneumo/console.read", "pneumo/console.operate"}
    assert "code_verifier" not in url


def test_sign_in_with_the_operator_scope(env: Setup) -> None:
    with _browser() as browser:
        start = browser.get(f"{env.base}/console/auth/start", params={"next": "/console/outbox"})
        pending_cookie = start.headers["set-cookie"].lower()
        assert pending_cookie.startswith("pneumo_console_oidc=")
        assert "httponly" in pending_cookie and "path=/console/auth" in pending_cookie
        done = browser.get(_from_idp(env, browser, start.headers["location"]))
        assert done.status_code == 303 and done.headers["location"] == "/console/outbox"
        cookies = done.headers.get_list("set-cookie")
        [session_cookie] = [c for c in cookies if c.startswith("pneumo_console=")]
        attributes = [a.strip().lower() for a in session_cookie.split(";")]
        assert "httponly" in attributes and any(a.startswith("samesite=") and a != "samesite=none" for a in attributes)
        assert "path=/console" in attributes
        max_age = int(next(a for a in attributes if a.startswith("max-age=")).split("=")[1])
        assert 0 < max_age <= 300  # never longer than the access token
        assert any(c.startswith("pneumo_console_oidc=") and "max-age=0" in c.lower() for c in cookies)  # spent
        overview = browser.get(f"{env.base}/console/")
        assert overview.status_code == 200 and "Jane Doe" in overview.text and "(operator)" in overview.text
        assert browser.get(f"{env.base}/console/outbox").status_code == 200
    assert env.idp.refusals == []

    def signed_in() -> list[dict[str, Any]]:
        return [e for o, e in _auth_records(env) if o == 0
                and any(p.get("user_id") == "jdoe" and p.get("user_name") == "Jane Doe" for p in e["participants"])
                and "oidc, role operate" in e["outcome_description"]]

    assert wait_until(signed_in, 10, "the sign-in audit record")


def test_the_read_scope_gives_the_read_only_role(env: Setup) -> None:
    retry_form = f'action="/console/outbox/{env.dead_letter}/retry"'
    with _browser() as operator:  # the operator scope: the dead letter has its Retry button
        assert _sign_in(env, operator).status_code == 303
        assert retry_form in operator.get(f"{env.base}/console/outbox").text
    env.idp.issue = lambda: env.idp.tokens.token(scope=READ, client_id=CLIENT_ID, sub="rdoe")
    with _browser() as browser:
        assert _sign_in(env, browser).status_code == 303
        outbox = browser.get(f"{env.base}/console/outbox")
        assert outbox.status_code == 200 and "rdoe" in outbox.text and "(read-only)" in outbox.text
        assert f"/console/outbox/{env.dead_letter}" in outbox.text  # listed, but not actionable
        assert retry_form not in outbox.text and ">Retry<" not in outbox.text
        assert ">Retry<" not in browser.get(f"{env.base}/console/outbox/{env.dead_letter}").text
        csrf = outbox.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        retry = browser.post(f"{env.base}/console/outbox/{env.dead_letter}/retry", data={"csrf_token": csrf})
        assert retry.status_code == 403 and "operator role" in retry.text
        assert browser.get(f"{env.base}/console/audit/export").status_code == 403
    assert _job_state(env) == "failed"


def test_a_token_without_console_scopes_is_refused_and_audited(env: Setup) -> None:
    env.idp.issue = lambda: env.idp.tokens.token(scope="openid system/*.read", client_id=CLIENT_ID, sub="outsider")
    with _browser() as browser:
        _refused(_sign_in(env, browser), 403, "may not use the console")
        assert browser.get(f"{env.base}/console/").status_code == 303

    def refused() -> list[dict[str, Any]]:
        return [e for o, e in _auth_records(env) if o == 4 and "may not use the console" in e["outcome_description"]]

    [event] = wait_until(refused, 10, "the refused sign-in audit record")
    assert event["event_types"][0]["code"] == "110122"  # Login
    assert any(p.get("network_access_point_id") == "127.0.0.1" for p in event["participants"])


def test_state_mismatch_is_refused(env: Setup) -> None:
    with _browser() as browser:
        callback = _from_idp(env, browser, _to_idp(env, browser))
        _refused(browser.get(_with_query(callback, state="forged-state")), 401, "state does not match")
        assert browser.get(f"{env.base}/console/").status_code == 303


def test_wrong_pkce_verifier_is_refused_by_the_idp(env: Setup) -> None:
    """The IdP is handed another challenge than the console's verifier answers (as when an
    attacker injects a code obtained with their own challenge): the token request fails."""
    with _browser() as browser:
        url = _to_idp(env, browser)
        other = base64.urlsafe_b64encode(hashlib.sha256(b"attacker's verifier" * 3).digest()).rstrip(b"=").decode()
        _refused(browser.get(_from_idp(env, browser, _with_query(url, code_challenge=other))), 401, "invalid_grant")
    assert env.idp.refusals == ["pkce"]


def test_a_finished_sign_in_cannot_be_replayed(env: Setup) -> None:
    with _browser() as browser:
        callback = _from_idp(env, browser, _to_idp(env, browser))
        assert browser.get(callback).status_code == 303
        browser.cookies.delete("pneumo_console")
        _refused(browser.get(callback), 401, "no sign-in in progress")  # the pending sign-in's cookie is spent


def test_an_expired_token_is_refused(env: Setup) -> None:
    env.idp.issue = lambda: env.idp.tokens.token(scope=OPERATE, client_id=CLIENT_ID, sub="jdoe", ttl=-3600)
    with _browser() as browser:
        response = _sign_in(env, browser)
        assert response.status_code == 401 and "expired" in response.text
        assert browser.get(f"{env.base}/console/").status_code == 303


def test_a_token_expired_within_the_leeway_is_refused(env: Setup) -> None:
    env.idp.issue = lambda: env.idp.tokens.token(scope=OPERATE, client_id=CLIENT_ID, sub="jdoe", ttl=-5)
    with _browser() as browser:
        _refused(_sign_in(env, browser), 401, "already expired")


def test_a_token_of_another_issuer_is_refused(env: Setup, tmp_path: Path) -> None:
    stranger = TokenService(tmp_path / "other-idp")
    env.idp.issue = lambda: stranger.token(scope=OPERATE, client_id=CLIENT_ID, sub="jdoe")
    with _browser() as browser:
        assert _sign_in(env, browser).status_code == 401


def test_the_callback_without_the_pending_cookie_is_refused(env: Setup) -> None:
    with _browser() as browser:
        callback = _from_idp(env, browser, _to_idp(env, browser))
    with _browser() as other:
        _refused(other.get(callback), 401, "no sign-in in progress")
    with _browser() as forged:
        forged.cookies.set("pneumo_console_oidc", "eyJzIjoieCJ9.AAAA", domain="127.0.0.1", path="/console/auth")
        _refused(forged.get(callback), 401, "no sign-in in progress")


def test_the_idp_error_is_reported(env: Setup) -> None:
    env.idp.error = "access_denied"
    with _browser() as browser:
        response = _sign_in(env, browser)
    _refused(response, 401, "sign-in refused by the identity provider (access_denied)")
    assert "<script>alert(1)</script>" not in response.text and "alert(1)" not in response.text


def test_a_code_the_idp_never_issued_is_refused(env: Setup) -> None:
    with _browser() as browser:
        callback = _from_idp(env, browser, _to_idp(env, browser))
        _refused(browser.get(_with_query(callback, code="never-issued")), 401, "invalid_grant")
    assert env.idp.refusals == ["code"]


def test_an_unreachable_token_endpoint_is_unavailable() -> None:
    settings = ConsoleOidcSettings(authorization_endpoint="http://127.0.0.1/authorize", client_id=CLIENT_ID)
    _, pending = oidc.start(settings, "http://127.0.0.1/console/auth/callback", "/console/")
    with pytest.raises(UnavailableError, match="cannot be reached"):
        oidc.exchange(settings, f"http://127.0.0.1:{free_port()}/token", code="c", state=pending.state, pending=pending,
                      redirect_uri="http://127.0.0.1/console/auth/callback")
    with pytest.raises(AuthenticationError, match="state does not match"):
        oidc.exchange(settings, f"http://127.0.0.1:{free_port()}/token", code="c", state="other", pending=pending,
                      redirect_uri="http://127.0.0.1/console/auth/callback")


def test_development_sign_in_is_off(env: Setup) -> None:
    with _browser() as browser:
        response = browser.post(f"{env.base}/console/login", data={"name": "x", "role": "operate"})
        assert response.status_code == 403
        assert browser.get(f"{env.base}/console/").status_code == 303


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example", "/fhir/metadata"])
def test_return_target_stays_inside_the_console(env: Setup, target: str) -> None:
    with _browser() as browser:
        response = _sign_in(env, browser, target)
        assert response.status_code == 303 and response.headers["location"] == "/console/"
