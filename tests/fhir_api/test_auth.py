"""Bearer-token authorisation of the FHIR API (fhir_api/auth.py): real keys, real JWK Sets, real JWTs.

Keys are generated with ``cryptography``, tokens signed with PyJWT (or, for the attacks PyJWT refuses
to produce, assembled by hand as RFC 7515 §3.1 describes); nothing is mocked. Time comes from an
injected clock, so expiry is tested without sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from conf.errors import AuthenticationError, InvalidInputError, PermissionDeniedError, UnavailableError
from conf.settings import FhirAuthSettings
from fhir_api.auth import (
    Interaction,
    Principal,
    TokenVerifier,
    anonymous_principal,
    is_loopback,
    scope_grants,
    smart_configuration,
)

ISS = "https://idp.hospital.example/realms/clinical"
AUD = "https://pneumo.hospital.example/fhir"
NOW = 1_800_000_000.0
SECRET = "a-development-shared-secret-of-40-chars!"
DROP = object()


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass(frozen=True)
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    pinned: rsa.RSAPrivateKey  # published with "alg": "RS256"
    stranger: rsa.RSAPrivateKey  # not in the JWK Set
    jwks_file: Path

    def public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _jwk(key: Any, kid: str, **extra: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPublicKey) else ECAlgorithm
    member: dict[str, Any] = algorithm.to_jwk(key, as_dict=True)
    return {**member, "kid": kid, "use": "sig", **extra}


def _jwks(keys: Keys) -> dict[str, Any]:
    return {
        "keys": [
            _jwk(keys.rsa.public_key(), "rsa-1"),
            _jwk(keys.ec.public_key(), "ec-1"),
            _jwk(keys.pinned.public_key(), "rsa-pinned", alg="RS256"),
        ]
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("jwks")
    made = Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        pinned=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        stranger=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        jwks_file=folder / "jwks.json",
    )
    made.jwks_file.write_text(json.dumps(_jwks(made)), encoding="utf-8")
    return made


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "svc-ehr",
        "client_id": "ehr-backend",
        "exp": int(NOW) + 300,
        "iat": int(NOW) - 5,
        "scope": "system/DiagnosticReport.rs system/Observation.rs",
    }
    for name, value in changes.items():
        if value is DROP:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def sign(payload: dict[str, Any], key: Any, alg: str = "RS256", kid: str | None = "rsa-1") -> str:
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid is not None else None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hand_made(header: dict[str, Any], payload: dict[str, Any], signer: Callable[[bytes], bytes]) -> str:
    """A JWS compact serialisation (RFC 7515 §3.1) built without PyJWT, for tokens PyJWT will not sign."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{_b64(signer(signing_input.encode('ascii')))}"


def settings(keys: Keys | None = None, **changes: Any) -> FhirAuthSettings:
    values: dict[str, Any] = {"mode": "jwt", "issuer": ISS, "audience": AUD}
    if keys is not None:
        values["jwks_file"] = keys.jwks_file
    values.update(changes)
    return FhirAuthSettings(**values)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(keys: Keys, clock: Clock) -> TokenVerifier:
    return TokenVerifier(settings(keys), bind="0.0.0.0", now=clock)


# ------------------------------------------------------------------------------ refusals (401)

REFUSED: list[tuple[str, Callable[[Keys], str | None], str]] = [
    ("no header", lambda k: None, "bearer token is required"),
    ("blank header", lambda k: "   ", "bearer token is required"),
    ("basic scheme", lambda k: "Basic ZWhyOnNlY3JldA==", "Bearer scheme"),
    ("scheme only", lambda k: "Bearer", "not a well-formed JWT"),
    ("garbage", lambda k: "Bearer not-a-token", "not a well-formed JWT"),
    ("three garbage segments", lambda k: "Bearer aaa.bbb.ccc", "not a well-formed JWT"),
    ("two tokens", lambda k: f"Bearer {sign(claims(), k.rsa)} {sign(claims(), k.rsa)}", "not a well-formed JWT"),
    ("signed by another key", lambda k: "Bearer " + sign(claims(), k.stranger), "signature does not verify"),
    ("payload altered after signing", lambda k: "Bearer " + _swap_payload(sign(claims(), k.rsa), claims(client_id="root")),
     "signature does not verify"),
    ("unknown kid", lambda k: "Bearer " + sign(claims(), k.stranger, kid="rsa-2"), "unknown key"),
    ("no kid, several keys", lambda k: "Bearer " + sign(claims(), k.rsa, kid=None), "names no key"),
    ("alg none", lambda k: "Bearer " + hand_made({"alg": "none", "kid": "rsa-1"}, claims(), lambda _: b""),
     "algorithm is not accepted"),
    ("alg none, signature segment left out", lambda k: "Bearer " + hand_made({"alg": "none"}, claims(), lambda _: b"")[:-1],
     "not a well-formed JWT"),
    ("HS256 signed with the RSA public key (algorithm confusion)",
     lambda k: "Bearer " + hand_made({"alg": "HS256", "kid": "rsa-1"}, claims(),
                                     lambda data: hmac.new(k.public_pem(), data, hashlib.sha256).digest()),
     "algorithm is not accepted"),
    ("HS512", lambda k: "Bearer " + jwt.encode(claims(), SECRET + SECRET, algorithm="HS512"), "algorithm is not accepted"),
    ("ES512 is not on the list", lambda k: "Bearer " + sign(claims(), ec.generate_private_key(ec.SECP521R1()), "ES512", "ec-1"),
     "algorithm is not accepted"),
    ("EC signature claiming the RSA key", lambda k: "Bearer " + sign(claims(), k.ec, "ES256", "rsa-1"), "does not match its key"),
    ("RSA key declared RS256 used with RS384", lambda k: "Bearer " + sign(claims(), k.pinned, "RS384", "rsa-pinned"),
     "does not match its key"),
    ("expired beyond the leeway", lambda k: "Bearer " + sign(claims(exp=int(NOW) - 31), k.rsa), "expired"),
    ("exp missing", lambda k: "Bearer " + sign(claims(exp=DROP), k.rsa), "no exp claim"),
    ("exp a string", lambda k: "Bearer " + sign(claims(exp=str(int(NOW) + 300)), k.rsa), "not a NumericDate"),
    ("exp a boolean", lambda k: "Bearer " + sign(claims(exp=True), k.rsa), "not a NumericDate"),
    ("nbf in the future", lambda k: "Bearer " + sign(claims(nbf=int(NOW) + 60), k.rsa), "not valid yet"),
    ("iat in the future", lambda k: "Bearer " + sign(claims(iat=int(NOW) + 3600), k.rsa), "issued in the future"),
    ("wrong issuer", lambda k: "Bearer " + sign(claims(iss="https://idp.elsewhere.example"), k.rsa), "configured issuer"),
    ("no issuer", lambda k: "Bearer " + sign(claims(iss=DROP), k.rsa), "no iss claim"),
    ("wrong audience", lambda k: "Bearer " + sign(claims(aud="https://other.example/fhir"), k.rsa), "not meant for this server"),
    ("audience list without ours", lambda k: "Bearer " + sign(claims(aud=["https://a.example", "https://b.example"]), k.rsa),
     "not meant for this server"),
    ("audience prefix only", lambda k: "Bearer " + sign(claims(aud=AUD + "/extra"), k.rsa), "not meant for this server"),
    ("no audience", lambda k: "Bearer " + sign(claims(aud=DROP), k.rsa), "no aud claim"),
    ("no client", lambda k: "Bearer " + sign(claims(client_id=DROP, sub=DROP), k.rsa), "names no client"),
    ("client_id not a string", lambda k: "Bearer " + sign(claims(client_id=7), k.rsa), "client_id claim"),
    ("scope not a string", lambda k: "Bearer " + sign(claims(scope=12), k.rsa), "scope claim"),
]


def _swap_payload(token: str, payload: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{_b64(json.dumps(payload).encode())}.{signature}"


@pytest.mark.parametrize(("make", "reason"), [(make, reason) for _, make, reason in REFUSED], ids=[row[0] for row in REFUSED])
def test_refused(verifier: TokenVerifier, keys: Keys, make: Callable[[Keys], str | None], reason: str) -> None:
    header = make(keys)
    with pytest.raises(AuthenticationError) as refused:
        verifier.verify(header)
    message = str(refused.value)
    assert reason in message
    if header and "." in header:  # never echo the token (its payload or signature) back
        for segment in header.split()[-1].split(".")[1:]:
            assert len(segment) < 8 or segment[:8] not in message
    assert verifier.cached_tokens == 0


def test_algorithm_confusion_refused_even_with_hs256_enabled(keys: Keys, clock: Clock) -> None:
    """With HS256 on, a token "signed" with the public key as the secret fails on its signature."""
    verifier = TokenVerifier(settings(keys, hs256_secret=SECRET), bind="0.0.0.0", now=clock)
    forged = hand_made({"alg": "HS256", "kid": "rsa-1"}, claims(),
                       lambda data: hmac.new(keys.public_pem(), data, hashlib.sha256).digest())
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verifier.verify(f"Bearer {forged}")
    # The same secret does work, so the refusal above is about the key, not HS256 as such.
    assert verifier.verify("Bearer " + jwt.encode(claims(), SECRET, algorithm="HS256")).client_id == "ehr-backend"


# ------------------------------------------------------------------------------ accepted tokens

ACCEPTED: list[tuple[str, Callable[[Keys], str], str]] = [
    ("RS256", lambda k: sign(claims(), k.rsa), "ehr-backend"),
    ("RS384", lambda k: sign(claims(), k.rsa, "RS384"), "ehr-backend"),
    ("RS512", lambda k: sign(claims(), k.rsa, "RS512"), "ehr-backend"),
    ("PS256", lambda k: sign(claims(), k.rsa, "PS256"), "ehr-backend"),
    ("ES256", lambda k: sign(claims(), k.ec, "ES256", "ec-1"), "ehr-backend"),
    ("declared RS256 key with RS256", lambda k: sign(claims(), k.pinned, "RS256", "rsa-pinned"), "ehr-backend"),
    ("audience list containing ours", lambda k: sign(claims(aud=["https://other.example", AUD]), k.rsa), "ehr-backend"),
    ("expired within the leeway", lambda k: sign(claims(exp=int(NOW) - 29), k.rsa), "ehr-backend"),
    ("nbf within the leeway", lambda k: sign(claims(nbf=int(NOW) + 29), k.rsa), "ehr-backend"),
    ("fractional exp (NumericDate)", lambda k: sign(claims(exp=NOW + 0.5), k.rsa), "ehr-backend"),
    ("azp when no client_id", lambda k: sign(claims(client_id=DROP, azp="portal"), k.rsa), "portal"),
    ("sub when no client_id nor azp", lambda k: sign(claims(client_id=DROP), k.rsa), "svc-ehr"),
]


@pytest.mark.parametrize(("make", "client_id"), [(make, cid) for _, make, cid in ACCEPTED], ids=[row[0] for row in ACCEPTED])
def test_accepted(verifier: TokenVerifier, keys: Keys, make: Callable[[Keys], str], client_id: str) -> None:
    principal = verifier.verify("Bearer " + make(keys))
    assert principal.client_id == client_id
    assert principal.subject == "svc-ehr"
    assert not principal.anonymous
    assert principal.expires_at is not None and principal.expires_at.tzinfo is UTC
    assert principal.allows("DiagnosticReport", "read") and not principal.allows("DiagnosticReport", "create")


def test_principal_from_token(verifier: TokenVerifier, keys: Keys) -> None:
    principal = verifier.verify("bearer  " + sign(claims(), keys.rsa))  # scheme case-insensitive (RFC 7235 §2.1)
    assert principal == Principal(
        client_id="ehr-backend",
        subject="svc-ehr",
        scopes=frozenset({"system/DiagnosticReport.rs", "system/Observation.rs"}),
        anonymous=False,
        expires_at=datetime.fromtimestamp(NOW + 300, tz=UTC),
    )


@pytest.mark.parametrize(
    "scp", [["system/DiagnosticReport.rs", "system/Observation.rs"], "system/DiagnosticReport.rs system/Observation.rs"]
)
def test_scp_claim(verifier: TokenVerifier, keys: Keys, scp: Any) -> None:
    principal = verifier.verify("Bearer " + sign(claims(scope=DROP, scp=scp), keys.rsa))
    assert principal.scopes == frozenset({"system/DiagnosticReport.rs", "system/Observation.rs"})


def test_no_scope_claim_means_no_access(verifier: TokenVerifier, keys: Keys) -> None:
    principal = verifier.verify("Bearer " + sign(claims(scope=DROP), keys.rsa))
    assert principal.scopes == frozenset()
    with pytest.raises(PermissionDeniedError):
        principal.require("DiagnosticReport", "read")


def test_single_key_file_accepts_a_token_without_kid(keys: Keys, clock: Clock, tmp_path: Path) -> None:
    (tmp_path / "one.json").write_text(json.dumps({"keys": [_jwk(keys.ec.public_key(), "only")]}), encoding="utf-8")
    verifier = TokenVerifier(settings(jwks_file=Path("one.json")), bind="0.0.0.0", base_dir=tmp_path, now=clock)
    assert verifier.verify("Bearer " + sign(claims(), keys.ec, "ES256", kid=None)).client_id == "ehr-backend"


def test_hs256_secret(keys: Keys, clock: Clock) -> None:
    verifier = TokenVerifier(settings(hs256_secret=SECRET), bind="0.0.0.0", now=clock)
    assert verifier.configured and any("development only" in w for w in verifier.warnings)
    assert verifier.verify("Bearer " + jwt.encode(claims(), SECRET, algorithm="HS256")).client_id == "ehr-backend"
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verifier.verify("Bearer " + jwt.encode(claims(), SECRET + "x", algorithm="HS256"))
    with pytest.raises(AuthenticationError, match="algorithm is not accepted"):  # no JWK Set: RS256 has no key
        verifier.verify("Bearer " + sign(claims(), keys.rsa))


# ------------------------------------------------------------------------------ scopes

SCOPE_MATRIX: list[tuple[str, str, Interaction, bool]] = [
    # v1 wildcard read: read, vread, search, history; never a write
    ("system/*.read", "DiagnosticReport", "read", True),
    ("system/*.read", "Observation", "vread", True),
    ("system/*.read", "ImagingStudy", "search", True),
    ("system/*.read", "Patient", "history", True),
    ("system/*.read", "DiagnosticReport", "create", False),
    ("system/*.read", "Subscription", "delete", False),
    # v1 per type
    ("system/DiagnosticReport.read", "DiagnosticReport", "read", True),
    ("system/DiagnosticReport.read", "DiagnosticReport", "search", True),
    ("system/DiagnosticReport.read", "Observation", "read", False),
    ("system/DiagnosticReport.read", "Observation", "search", False),
    ("system/DiagnosticReport.read", "DiagnosticReport", "update", False),
    # v1 write and *
    ("system/Subscription.write", "Subscription", "create", True),
    ("system/Subscription.write", "Subscription", "update", True),
    ("system/Subscription.write", "Subscription", "delete", True),
    ("system/Subscription.write", "Subscription", "read", False),
    ("system/Subscription.write", "Subscription", "search", False),
    ("system/*.*", "Subscription", "delete", True),
    ("system/*.*", "Observation", "search", True),
    # the audit log is granted only by a scope naming it (fhir_api.auth.EXPLICIT_SCOPE_TYPES)
    ("system/*.*", "AuditEvent", "search", False),
    ("system/*.rs", "AuditEvent", "read", False),
    ("system/AuditEvent.rs", "AuditEvent", "search", True),
    ("system/AuditEvent.read", "AuditEvent", "read", True),
    # v2
    ("system/*.rs", "Observation", "read", True),
    ("system/*.rs", "Observation", "search", True),
    ("system/*.rs", "Device", "history", True),
    ("system/*.rs", "Observation", "create", False),
    ("system/DiagnosticReport.r", "DiagnosticReport", "read", True),
    ("system/DiagnosticReport.r", "DiagnosticReport", "vread", True),
    ("system/DiagnosticReport.r", "DiagnosticReport", "history", True),
    ("system/DiagnosticReport.r", "DiagnosticReport", "search", False),
    ("system/DiagnosticReport.s", "DiagnosticReport", "search", True),
    ("system/DiagnosticReport.s", "DiagnosticReport", "read", False),
    ("system/Subscription.cruds", "Subscription", "create", True),
    ("system/Subscription.cruds", "Subscription", "update", True),
    ("system/Subscription.cruds", "Subscription", "delete", True),
    ("system/Subscription.cruds", "Subscription", "read", True),
    ("system/Subscription.cruds", "Subscription", "search", True),
    ("system/Subscription.cruds", "DiagnosticReport", "read", False),
    ("system/Subscription.cu", "Subscription", "create", True),
    ("system/Subscription.cu", "Subscription", "update", True),
    ("system/Subscription.cu", "Subscription", "delete", False),
    ("system/Subscription.d", "Subscription", "delete", True),
    # undefined or out-of-order permissions grant nothing (SMART 2.x: ".dus" is not a scope)
    ("system/Subscription.dus", "Subscription", "delete", False),
    ("system/Subscription.sr", "Subscription", "read", False),
    ("system/Observation.rr", "Observation", "read", False),
    ("system/Observation.", "Observation", "read", False),
    ("system/Observation.READ", "Observation", "read", False),
    ("system/observation.read", "Observation", "read", False),
    ("system/Observation.read extra", "Observation", "read", False),  # one token here; split happens in the verifier
    # patient/ and user/ scopes, and query-restricted v2 scopes, grant nothing
    ("patient/*.read", "DiagnosticReport", "read", False),
    ("patient/*.rs", "Observation", "search", False),
    ("user/*.cruds", "DiagnosticReport", "read", False),
    ("user/DiagnosticReport.read", "DiagnosticReport", "read", False),
    ("system/Observation.rs?category=x", "Observation", "search", False),
    ("system/Observation.rs?category=x", "Observation", "read", False),
    ("system/*.rs?_security=R", "Observation", "read", False),
    # other kinds of scope
    ("openid", "Patient", "read", False),
    ("launch/patient", "Patient", "read", False),
    ("", "Patient", "read", False),
]


@pytest.mark.parametrize(("scope", "resource_type", "interaction", "allowed"), SCOPE_MATRIX)
def test_scope_matrix(scope: str, resource_type: str, interaction: Interaction, allowed: bool) -> None:
    principal = Principal(client_id="c", subject=None, scopes=frozenset({scope}), anonymous=False, expires_at=None)
    assert principal.allows(resource_type, interaction) is allowed
    if allowed:
        principal.require(resource_type, interaction)
    else:
        with pytest.raises(PermissionDeniedError):
            principal.require(resource_type, interaction)


def test_scopes_combine() -> None:
    principal = Principal(
        client_id="c", subject=None, anonymous=False, expires_at=None,
        scopes=frozenset({"system/DiagnosticReport.r", "system/DiagnosticReport.s", "system/Observation.rs?code=x", "openid"}),
    )
    assert principal.allows("DiagnosticReport", "read") and principal.allows("DiagnosticReport", "search")
    assert not principal.allows("Observation", "read")


@pytest.mark.parametrize(
    ("interaction", "needed"),
    [
        ("read", "system/DiagnosticReport.read or system/DiagnosticReport.r"),
        ("history", "system/DiagnosticReport.read or system/DiagnosticReport.r"),
        ("search", "system/DiagnosticReport.read or system/DiagnosticReport.s"),
        ("create", "system/DiagnosticReport.write or system/DiagnosticReport.c"),
        ("update", "system/DiagnosticReport.write or system/DiagnosticReport.u"),
        ("delete", "system/DiagnosticReport.write or system/DiagnosticReport.d"),
    ],
)
def test_require_names_the_scope(interaction: Interaction, needed: str) -> None:
    principal = Principal(client_id="c", subject=None, scopes=frozenset({"system/Observation.cruds"}), anonymous=False,
                          expires_at=None)
    with pytest.raises(PermissionDeniedError, match=f"needs scope {needed}$"):
        principal.require("DiagnosticReport", interaction)


def test_scope_grants() -> None:
    assert scope_grants("system/*.read") == ("*", frozenset({"read", "vread", "search", "history"}))
    assert scope_grants("system/Observation.write") == ("Observation", frozenset({"create", "update", "delete"}))
    assert scope_grants("system/Observation.s") == ("Observation", frozenset({"search"}))
    assert scope_grants("patient/Observation.rs") is None
    assert scope_grants("system/Observation.rs?category=laboratory") is None


# ------------------------------------------------------------------------------ anonymous mode


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.4.5.6", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"])
def test_anonymous_on_loopback(bind: str) -> None:
    verifier = TokenVerifier(FhirAuthSettings(mode="anonymous"), bind=bind)
    assert verifier.configured and any("without authentication" in w for w in verifier.warnings)
    for header in (None, "Bearer garbage", "Basic xyz"):  # the header is ignored
        principal = verifier.verify(header)
        assert principal == anonymous_principal() and principal.anonymous and principal.client_id == "anonymous"
    assert principal.allows("DiagnosticReport", "read") and principal.allows("Observation", "search")
    assert not principal.allows("AuditEvent", "search")  # the audit log needs system/AuditEvent.rs
    assert not principal.allows("Subscription", "create") and not principal.allows("DiagnosticReport", "delete")


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "", "10.1.2.3", "192.168.0.10", "pneumo.hospital.example", "::ffff:10.0.0.1"])
def test_anonymous_refused_off_loopback(bind: str) -> None:
    with pytest.raises(InvalidInputError, match="loopback"):
        TokenVerifier(FhirAuthSettings(mode="anonymous"), bind=bind)


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("localhost.example") and not is_loopback("128.0.0.1")


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("changes", "missing"),
    [
        ({}, "a key source"),
        ({"issuer": None, "hs256_secret": SECRET}, "issuer"),
        ({"audience": None, "hs256_secret": SECRET}, "audience"),
    ],
)
def test_not_configured_refuses_everything(keys: Keys, changes: dict[str, Any], missing: str) -> None:
    verifier = TokenVerifier(settings(**changes), bind="0.0.0.0")
    assert not verifier.configured
    assert any(missing in w and "not configured" in w for w in verifier.warnings)
    token = jwt.encode(claims(exp=2**31), SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError, match="not configured"):
        verifier.verify(f"Bearer {token}")


def test_both_key_urls_refused(keys: Keys) -> None:
    with pytest.raises(InvalidInputError, match="not both"):
        TokenVerifier(settings(keys, jwks_url="https://idp.hospital.example/jwks"), bind="0.0.0.0")


def test_missing_jwks_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot be read"):
        TokenVerifier(settings(jwks_file=Path("absent.json")), bind="0.0.0.0", base_dir=tmp_path)


@pytest.mark.parametrize("content", ["not json", "[]", '{"keys": {}}'])
def test_malformed_jwks_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "jwks.json").write_text(content, encoding="utf-8")
    with pytest.raises(InvalidInputError, match="jwks_file"):
        TokenVerifier(settings(jwks_file=tmp_path / "jwks.json"), bind="0.0.0.0")


@pytest.mark.filterwarnings("ignore:The RSA key is 1024 bits")  # PyJWT warns when the test signs with the weak key
def test_unusable_jwks_members_are_skipped(keys: Keys, tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    members = [
        {"kty": "oct", "kid": "shared", "k": _b64(SECRET.encode())},
        _jwk(weak.public_key(), "weak"),
        {**_jwk(keys.rsa.public_key(), "enc"), "use": "enc"},
        RSAAlgorithm.to_jwk(keys.stranger, as_dict=True) | {"kid": "private"},
        "not an object",
    ]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": members}), encoding="utf-8")
    with pytest.raises(InvalidInputError, match="no usable public key"):
        TokenVerifier(settings(jwks_file=path), bind="0.0.0.0")

    path.write_text(json.dumps({"keys": [*members, _jwk(keys.rsa.public_key(), "rsa-1")]}), encoding="utf-8")
    verifier = TokenVerifier(settings(jwks_file=path), bind="0.0.0.0", now=Clock())
    joined = "\n".join(verifier.warnings)
    for reason in ("symmetric", "1024 bits", "'enc'", "private key", "not a JSON object"):
        assert reason in joined
    assert verifier.verify("Bearer " + sign(claims(), keys.rsa)).client_id == "ehr-backend"
    with pytest.raises(AuthenticationError, match="unknown key"):
        verifier.verify("Bearer " + sign(claims(), weak, kid="weak"))
    with pytest.raises(AuthenticationError, match="algorithm is not accepted"):  # the oct key never verifies HS256
        verifier.verify("Bearer " + jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "shared"}))


# ------------------------------------------------------------------------------ cache


def test_cache_returns_the_same_principal(verifier: TokenVerifier, keys: Keys) -> None:
    header = "Bearer " + sign(claims(), keys.rsa)
    first = verifier.verify(header)
    assert verifier.verify(header) is first
    assert verifier.cached_tokens == 1


def test_cached_token_still_expires(keys: Keys, clock: Clock) -> None:
    verifier = TokenVerifier(settings(keys, leeway_seconds=0), bind="0.0.0.0", now=clock)
    header = "Bearer " + sign(claims(exp=int(NOW) + 5), keys.rsa)
    assert verifier.verify(header).client_id == "ehr-backend"
    clock.t = NOW + 4.999
    assert verifier.verify(header).client_id == "ehr-backend"
    clock.t = NOW + 5
    with pytest.raises(AuthenticationError, match="expired"):
        verifier.verify(header)
    assert verifier.cached_tokens == 0


def test_cached_token_expires_with_leeway(keys: Keys, clock: Clock) -> None:
    verifier = TokenVerifier(settings(keys, leeway_seconds=10), bind="0.0.0.0", now=clock)
    header = "Bearer " + sign(claims(exp=int(NOW) + 5), keys.rsa)
    verifier.verify(header)
    clock.t = NOW + 14.9
    verifier.verify(header)
    clock.t = NOW + 15
    with pytest.raises(AuthenticationError, match="expired"):
        verifier.verify(header)


def test_cache_entries_are_rechecked_after_a_minute(verifier: TokenVerifier, keys: Keys, clock: Clock) -> None:
    header = "Bearer " + sign(claims(exp=int(NOW) + 3600), keys.rsa)
    first = verifier.verify(header)
    clock.t = NOW + 59
    assert verifier.verify(header) is first
    clock.t = NOW + 61
    again = verifier.verify(header)
    assert again == first and again is not first


def test_cache_is_bounded(keys: Keys, clock: Clock) -> None:
    verifier = TokenVerifier(settings(keys), bind="0.0.0.0", now=clock, cache_size=2)
    headers = ["Bearer " + sign(claims(jti=f"t{n}"), keys.rsa) for n in range(3)]
    principals = [verifier.verify(h) for h in headers]
    assert verifier.cached_tokens == 2
    assert verifier.verify(headers[2]) is principals[2]  # most recent kept
    assert verifier.verify(headers[0]) is not principals[0]  # oldest evicted, verified again


def test_cache_is_thread_safe(keys: Keys, clock: Clock) -> None:
    verifier = TokenVerifier(settings(keys), bind="0.0.0.0", now=clock, cache_size=4)
    headers = ["Bearer " + sign(claims(client_id=f"client-{n}"), keys.ec, "ES256", "ec-1") for n in range(8)]
    errors: list[BaseException] = []
    seen: list[set[str]] = []

    def work(offset: int) -> None:
        names: set[str] = set()
        try:
            for i in range(300):
                names.add(verifier.verify(headers[(offset + i) % len(headers)]).client_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        seen.append(names)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(names == {f"client-{n}" for n in range(8)} for names in seen)
    assert verifier.cached_tokens <= 4


# ------------------------------------------------------------------------------ jwks_url


class _JwksServer:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.status = 200
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests += 1
                body = json.dumps(server.document).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server(keys: Keys) -> Iterator[_JwksServer]:
    server = _JwksServer(_jwks(keys))
    yield server
    server.close()


def test_jwks_url(jwks_server: _JwksServer, keys: Keys, clock: Clock) -> None:
    verifier = TokenVerifier(settings(jwks_url=jwks_server.url), bind="0.0.0.0", now=clock)
    assert verifier.configured and not verifier.warnings  # plain http to loopback is not worth a warning
    assert jwks_server.requests == 0  # nothing fetched at start
    assert verifier.verify("Bearer " + sign(claims(), keys.rsa)).client_id == "ehr-backend"
    assert verifier.verify("Bearer " + sign(claims(), keys.ec, "ES256", "ec-1")).client_id == "ehr-backend"
    assert verifier.verify("Bearer " + sign(claims(), keys.rsa, "PS256")).client_id == "ehr-backend"
    assert jwks_server.requests == 1  # the set is cached
    with pytest.raises(AuthenticationError, match="does not match its key"):  # the served JWK declares RS256
        verifier.verify("Bearer " + sign(claims(), keys.pinned, "RS384", "rsa-pinned"))
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verifier.verify("Bearer " + sign(claims(), keys.stranger))
    with pytest.raises(AuthenticationError, match="unknown key"):
        verifier.verify("Bearer " + sign(claims(), keys.stranger, kid="rotated-away"))
    with pytest.raises(AuthenticationError, match="names no key"):
        verifier.verify("Bearer " + sign(claims(), keys.rsa, kid=None))


def test_jwks_url_unavailable(jwks_server: _JwksServer, keys: Keys, clock: Clock) -> None:
    jwks_server.status = 500
    verifier = TokenVerifier(settings(jwks_url=jwks_server.url), bind="0.0.0.0", now=clock)
    with pytest.raises(UnavailableError):
        verifier.verify("Bearer " + sign(claims(), keys.rsa))


def test_jwks_url_must_be_http(clock: Clock) -> None:
    with pytest.raises(InvalidInputError, match="https URL"):
        TokenVerifier(settings(jwks_url="file:///etc/jwks.json"), bind="0.0.0.0", now=clock)
    verifier = TokenVerifier(settings(jwks_url="http://idp.hospital.example/jwks"), bind="0.0.0.0", now=clock)
    assert any("plain http" in w for w in verifier.warnings)


# ------------------------------------------------------------------------------ discovery


def test_smart_configuration() -> None:
    document = smart_configuration(settings(token_endpoint="https://idp.hospital.example/token", hs256_secret=SECRET))
    assert document["token_endpoint"] == "https://idp.hospital.example/token"
    assert document["grant_types_supported"] == ["client_credentials"]
    assert document["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert {"RS384", "ES384"} <= set(document["token_endpoint_auth_signing_alg_values_supported"])
    assert {"client-confidential-asymmetric", "permission-v1", "permission-v2"} <= set(document["capabilities"])
    assert "permission-patient" not in document["capabilities"] and "permission-user" not in document["capabilities"]
    assert {"system/*.rs", "system/*.read", "system/DiagnosticReport.rs"} <= set(document["scopes_supported"])
    for scope in document["scopes_supported"]:  # "The server SHALL support all scopes listed here"
        assert scope_grants(scope) is not None, scope
    assert "issuer" not in document  # only with sso-openid-connect (SMART 2.x, Conformance)
    json.dumps(document)


def test_smart_configuration_without_token_endpoint() -> None:
    document = smart_configuration(settings(), scopes_supported=["system/Subscription.cruds"])
    assert "token_endpoint" not in document
    assert document["scopes_supported"] == ["system/Subscription.cruds"]
