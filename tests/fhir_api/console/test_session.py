"""Console session cookies and CSRF tokens (fhir_api.console.session.SessionCodec), as pure units."""

from __future__ import annotations

import base64
import json

import pytest

from fhir_api.console.session import ConsoleUser, Role, SessionCodec

NOW = 1_800_000_000.0


def _issue(codec: SessionCodec, *, role: Role = Role.OPERATE, lifetime: float = 600, now: float = NOW) -> str:
    return codec.issue(name="Jane Doe", subject="jdoe", role=role, lifetime_seconds=lifetime, via="oidc", now=now)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize("role", [Role.READ, Role.OPERATE])
def test_round_trip(role: Role) -> None:
    codec = SessionCodec()
    user = codec.read(_issue(codec, role=role), now=NOW + 1)
    assert user is not None
    assert (user.name, user.subject, user.role, user.via, user.expires_at) == ("Jane Doe", "jdoe", role, "oidc", NOW + 600)
    assert user.may_operate is (role is Role.OPERATE)
    assert len(user.session_id) >= 20


def test_each_session_has_its_own_id() -> None:
    codec = SessionCodec()
    first, second = codec.read(_issue(codec), now=NOW), codec.read(_issue(codec), now=NOW)
    assert first is not None and second is not None and first.session_id != second.session_id


def _tampered_body(cookie: str) -> str:
    version, body, signature = cookie.split(".")
    claims = json.loads(_unb64(body))
    claims["role"] = "operate" if claims["role"] == "read" else "read"
    return f"{version}.{_b64(json.dumps(claims).encode())}.{signature}"


def _tampered_signature(cookie: str) -> str:
    version, body, signature = cookie.split(".")
    raw = bytearray(_unb64(signature))
    raw[0] ^= 1
    return f"{version}.{body}.{_b64(bytes(raw))}"


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(_tampered_body, id="body"),
        pytest.param(_tampered_signature, id="signature"),
        pytest.param(lambda c: "v2" + c[2:], id="version"),
        pytest.param(lambda c: c.rsplit(".", 1)[0], id="no-signature"),
        pytest.param(lambda c: c + ".x", id="extra-part"),
        pytest.param(lambda c: c[:-3], id="truncated"),
        pytest.param(lambda c: "v1.!!!.???", id="not-base64"),
        pytest.param(lambda c: "", id="empty"),
        pytest.param(lambda c: "v1." + "A" * 5000 + ".x", id="too-long"),
    ],
)
def test_altered_cookie_is_refused(alter: object) -> None:
    codec = SessionCodec()
    cookie = _issue(codec, role=Role.READ)
    assert codec.read(cookie, now=NOW) is not None
    assert codec.read(alter(cookie), now=NOW) is None  # type: ignore[operator]


def test_validly_signed_but_malformed_claims_are_refused() -> None:
    codec = SessionCodec(b"k" * 32)
    body = json.dumps({"sid": "x", "name": "n", "sub": "s", "role": "admin", "exp": NOW + 60, "via": "dev"}).encode()
    forged = f"v1.{_b64(body)}.{_b64(codec._mac('session', body))}"  # noqa: SLF001 - a correctly signed bad role
    assert codec.read(forged, now=NOW) is None


def test_none_cookie_is_refused() -> None:
    assert SessionCodec().read(None) is None


def test_expired_cookie_is_refused() -> None:
    codec = SessionCodec()
    cookie = _issue(codec, lifetime=60)
    assert codec.read(cookie, now=NOW + 59) is not None
    assert codec.read(cookie, now=NOW + 60) is None
    assert codec.read(cookie, now=NOW + 3600) is None


def test_another_keys_cookie_is_refused() -> None:
    ours, theirs = SessionCodec(), SessionCodec()
    assert theirs.read(_issue(ours), now=NOW) is None
    same_key = SessionCodec(b"s" * 32)
    assert SessionCodec(b"s" * 32).read(_issue(same_key), now=NOW) is not None  # the key, not the object, decides


def test_revoked_session_is_refused_and_others_are_not() -> None:
    codec = SessionCodec()
    cookie, other = _issue(codec), _issue(codec)
    user = codec.read(cookie, now=NOW)
    assert user is not None
    codec.revoke(user, now=NOW)
    assert codec.read(cookie, now=NOW) is None
    assert codec.read(other, now=NOW) is not None


def test_revocation_list_forgets_expired_sessions() -> None:
    codec = SessionCodec()
    short = codec.read(_issue(codec, lifetime=60), now=NOW)
    long = codec.read(_issue(codec, lifetime=6000), now=NOW)
    assert short is not None and long is not None
    codec.revoke(short, now=NOW)
    codec.revoke(long, now=NOW)
    assert set(codec._revoked) == {short.session_id, long.session_id}  # noqa: SLF001
    later = codec.read(_issue(codec, lifetime=6000, now=NOW + 120), now=NOW + 120)
    assert later is not None
    codec.revoke(later, now=NOW + 120)  # pruning happens on the next revocation
    assert set(codec._revoked) == {long.session_id, later.session_id}  # noqa: SLF001
    assert codec.read(_issue(codec, lifetime=6000), now=NOW + 120) is not None


def _user(session_id: str) -> ConsoleUser:
    return ConsoleUser(session_id=session_id, name="n", subject="s", role=Role.OPERATE, expires_at=NOW + 60, via="dev")


def test_csrf_token_is_valid_only_for_its_session() -> None:
    codec = SessionCodec()
    alice, bob = _user("session-a"), _user("session-b")
    token = codec.csrf_token(alice)
    assert codec.csrf_valid(alice, token)
    assert codec.csrf_token(alice) == token  # stable for the session: every form of one page has it
    assert not codec.csrf_valid(bob, token)
    assert not codec.csrf_valid(alice, None)
    assert not codec.csrf_valid(alice, "")
    assert not codec.csrf_valid(alice, token[:-1])
    assert not SessionCodec().csrf_valid(alice, token)  # another process's key


def test_csrf_token_is_not_a_signature_for_another_purpose() -> None:
    codec = SessionCodec()
    user = _user("session-a")
    signed = codec.sign("oidc", "session-a")
    assert codec.csrf_token(user) != signed.split(".")[1]


def test_sign_and_unsign() -> None:
    codec = SessionCodec()
    signed = codec.sign("oidc", '{"s":"state","v":"verifier"} ünïcode')
    assert codec.unsign("oidc", signed) == '{"s":"state","v":"verifier"} ünïcode'
    text, _, mac = signed.partition(".")
    assert codec.unsign("oidc", f"{_b64(b'other')}.{mac}") is None
    assert codec.unsign("oidc", f"{text}.{_b64(b'x' * 32)}") is None
    for bad in (None, "", "nodot", "a" * 5000 + ".b", "!!!.???"):
        assert codec.unsign("oidc", bad) is None
    assert SessionCodec().unsign("oidc", signed) is None


def test_purposes_are_not_interchangeable() -> None:
    codec = SessionCodec()
    signed = codec.sign("oidc", "value")
    assert codec.unsign("other", signed) is None
    assert codec.unsign("session", signed) is None
    assert codec.unsign("csrf", signed) is None
    # A session cookie's MAC is not an "oidc" signature of its body, nor the reverse.
    cookie = _issue(codec)
    _, body, signature = cookie.split(".")
    assert codec.unsign("oidc", f"{body}.{signature}") is None
    assert codec.unsign("session", f"{body}.{signature}") == _unb64(body).decode()
    oidc_text, _, oidc_mac = codec.sign("oidc", _unb64(body).decode()).partition(".")
    assert codec.read(f"v1.{oidc_text}.{oidc_mac}", now=NOW) is None
