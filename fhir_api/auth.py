"""Who may call the FHIR API: bearer JWT access tokens and SMART scopes (docs/fhir.md, "Security").

The gateway is an OAuth 2.0 *resource server*. The hospital's token service (the IdP) authenticates
clients - SMART Backend Services (SMART App Launch 2.x, "Backend Services"): ``client_credentials``
with a ``private_key_jwt`` assertion - and issues JWT access tokens (RFC 7519, profiled by RFC 9068);
this module checks them and answers "may this client do that to this resource type". It has no
FastAPI dependency: the API layer passes the ``Authorization`` header to :meth:`TokenVerifier.verify`
and the resulting :class:`Principal` to its handlers, and maps :class:`~conf.errors.AuthenticationError`
to 401 (with ``WWW-Authenticate: Bearer``, RFC 6750 §3) and :class:`~conf.errors.PermissionDeniedError`
to 403.

Decisions (each one refuses rather than guesses):

* **Algorithms.** A JWK Set key verifies RS256, RS384, RS512, PS256 (RSA keys of at least 2048
  bits) or ES256/ES384 (P-256/P-384 keys); HS256 is verified with ``hs256_secret`` and nothing
  else. ``none`` is never accepted, and a token's ``alg`` never selects how a JWK Set key is used:
  an HS256 token signed with the RSA public key as the HMAC secret (the algorithm-confusion attack,
  RFC 8725 §2.1 and §3.1) fails. A JWK that declares its ``alg`` (RFC 7517 §4.4) is used with that
  algorithm only.
* **Issuer and audience are required** in jwt mode: a token is accepted only when ``iss`` equals
  ``fhir.auth.issuer`` and ``aud`` (a string or a list, RFC 7519 §4.1.3) contains
  ``fhir.auth.audience`` (RFC 9068 §4). Without both, or without a key source, the verifier is
  *not configured*: it starts (the server logs :attr:`TokenVerifier.warnings`) but refuses every token.
* **exp is required** (RFC 9068 §2.2); ``nbf`` and ``iat`` are checked when present (RFC 7519
  §4.1.4, §4.1.5), all with ``leeway_seconds`` of clock skew.
* **Key ids.** A token verified against a JWK Set names its key with ``kid`` (RFC 7515 §4.1.4); only a
  JWK Set *file* holding exactly one key accepts tokens without one. ``typ`` is not checked: RFC 9068
  §4 asks for ``at+jwt``, which most hospital IdPs do not emit; the ``aud`` check already keeps
  ID tokens (whose audience is the client) out.
* **jwks_url** keys are fetched with :class:`jwt.PyJWKClient`: the whole set is cached for 5 minutes
  and an unknown ``kid`` forces at most one re-fetch per 30 s. Its per-kid LRU cache stays off: it
  never expires, so a key the IdP withdrew would be trusted until restart. A failed fetch is
  :class:`~conf.errors.UnavailableError` (503: nobody's token is wrong). Nothing is fetched at start.
* **Scopes** (SMART App Launch 2.x, "Scopes and Launch Context"): ``system/`` scopes in v1
  (``.read``, ``.write``, ``.*``) and v2 (``.cruds`` letters) syntax. ``patient/`` scopes need a
  patient launch context, and ``user/`` scopes are bounded by the user's own permissions; the gateway
  has neither, so honouring them would grant more than the IdP meant: both grant nothing. So does a
  v2 scope narrowed by ``?param=value``: ignoring the restriction would widen it.
* **Anonymous mode** (development) is allowed only on a loopback bind; it ignores any
  ``Authorization`` header and grants read and search on every type, never a write.
* **Verified tokens are cached** (by SHA-256 of the token, at most ``cache_size``, each for at most
  60 s and never past its ``exp`` plus leeway) so a client sending many requests with one token pays
  one signature check a minute. A key withdrawn from the JWK Set stops working within 60 s.
* **Nothing secret is logged or echoed**: error messages name the failed check, never the token or
  its claims; :class:`Principal` holds the client id, subject, scopes and expiry only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, get_args
from urllib.parse import urlparse

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, SECP384R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from conf.errors import AuthenticationError, InvalidInputError, PermissionDeniedError, UnavailableError
from conf.settings import FhirAuthSettings

#: A FHIR RESTful interaction (FHIR R4 http.html) as the API layer asks about it. ``history`` is
#: *instance* history (``GET [type]/[id]/_history``), granted by ``r`` like read and vread; SMART
#: 2.x grants *type* and *system* history with ``s``, so the API layer asks for ``search`` there.
#: ``patch`` is an ``update`` (SMART 2.x: ``u`` covers instance update and patch).
Interaction = Literal["read", "vread", "search", "history", "create", "update", "delete"]

_ALL_INTERACTIONS: Final[frozenset[Interaction]] = frozenset(get_args(Interaction))

#: The scopes an anonymous caller holds (v1 and v2 spelling of "read and search everything").
ANONYMOUS_SCOPES: Final[frozenset[str]] = frozenset({"system/*.read", "system/*.rs"})

#: Signature algorithms accepted with JWK Set keys (RFC 7518 §3.1); HS256 only with hs256_secret.
JWKS_ALGORITHMS: Final[tuple[str, ...]] = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
_RSA_ALGORITHMS: Final[frozenset[str]] = frozenset({"RS256", "RS384", "RS512", "PS256"})
_EC_ALGORITHM_CURVE: Final[Mapping[str, type[SECP256R1] | type[SECP384R1]]] = {"ES256": SECP256R1, "ES384": SECP384R1}
_MIN_RSA_BITS: Final = 2048  # NIST SP 800-131A; RFC 7518 §3.3 "2048 bits or larger MUST be used"

#: The resource types the FHIR façade serves (docs/fhir.md); only Subscription is writable.
SERVED_RESOURCE_TYPES: Final[tuple[str, ...]] = (
    "DiagnosticReport", "Observation", "ImagingStudy", "Patient", "Device", "ServiceRequest", "Binary", "Subscription",
)

#: Types a wildcard scope (``system/*.rs``) does not cover: only a scope naming the type grants them.
#: The audit log says who read which patient's records; a client allowed to read every clinical
#: resource has no need to know that (HIPAA minimum necessary, 45 CFR 164.502(b)), and SMART 2.x lets a
#: server grant less than the token's scopes. So ``system/AuditEvent.rs`` is needed (fhir_api.audit_event_routes).
EXPLICIT_SCOPE_TYPES: Final[frozenset[str]] = frozenset({"AuditEvent"})

_CACHE_SECONDS: Final = 60.0
_MAX_TOKEN_CHARS: Final = 16384  # an access token lives in an HTTP header (SMART 2.x, "Scope size over the wire")
_JWKS_LIFESPAN_SECONDS: Final = 300.0
_JWKS_FETCH_TIMEOUT_SECONDS: Final = 5.0
_MAX_NUMERIC_DATE: Final = 253402300799  # 9999-12-31T23:59:59Z, the last instant datetime can hold


# --------------------------------------------------------------------------------------- scopes

#: SMART App Launch 2.x, "Clinical Scope Syntax": context "/" (type | "*") "." permissions ["?" query].
_SCOPE = re.compile(r"(?P<context>patient|user|system)/(?P<type>[A-Z][A-Za-z]*|\*)\.(?P<perm>[^?]+)(?P<query>\?.*)?")
#: v2 permissions are a non-empty subsequence of the in-order string "cruds"; anything else (".dus",
#: ".rr") is undefined and "MAY be ignored" (SMART 2.x) - we ignore it.
_V2_PERMISSIONS = re.compile(r"(?=.)c?r?u?d?s?")
_V2_LETTERS: Final[Mapping[str, frozenset[Interaction]]] = {
    "c": frozenset({"create"}),
    "r": frozenset({"read", "vread", "history"}),
    "u": frozenset({"update"}),
    "d": frozenset({"delete"}),
    "s": frozenset({"search"}),
}
#: SMART 2.x: v1 ".read" => v2 ".rs", ".write" => ".cud", ".*" => ".cruds".
_V1_PERMISSIONS: Final[Mapping[str, str]] = {"read": "rs", "write": "cud", "*": "cruds"}
#: Contexts whose scopes grant anything here (see the module docstring for user/ and patient/).
_GRANTING_CONTEXTS: Final[frozenset[str]] = frozenset({"system"})


def _interactions(permissions: str) -> frozenset[Interaction]:
    letters = _V1_PERMISSIONS.get(permissions, permissions)
    if not _V2_PERMISSIONS.fullmatch(letters):
        return frozenset()
    granted: set[Interaction] = set()
    for letter in letters:
        granted |= _V2_LETTERS[letter]
    return frozenset(granted)


def scope_grants(scope: str) -> tuple[str, frozenset[Interaction]] | None:
    """What one scope grants: ``(resource type or "*", interactions)``, or None when it grants nothing.

    None for scopes of other kinds (``openid``, ``launch``), malformed or undefined permission strings,
    ``patient/`` and ``user/`` scopes, and v2 scopes restricted by a query (``Observation.rs?category=x``).
    """
    match = _SCOPE.fullmatch(scope)
    if match is None or match["context"] not in _GRANTING_CONTEXTS or match["query"] is not None:
        return None
    interactions = _interactions(match["perm"])
    return (match["type"], interactions) if interactions else None


def _required_scope(resource_type: str, interaction: Interaction) -> str:
    v1 = "write" if interaction in ("create", "update", "delete") else "read"
    v2 = {"create": "c", "update": "u", "delete": "d", "search": "s"}.get(interaction, "r")
    return f"system/{resource_type}.{v1} or system/{resource_type}.{v2}"


@dataclass(frozen=True)
class Principal:
    """The caller of one request, as its verified token (or anonymous mode) describes it.

    ``client_id`` is the OAuth client (RFC 9068 §2.2 ``client_id``, else the OIDC ``azp``, else
    ``sub``): the one value the audit trail records. ``scopes`` are the raw scope strings;
    :meth:`allows` interprets them.
    """

    client_id: str
    subject: str | None
    scopes: frozenset[str]
    anonymous: bool
    expires_at: datetime | None
    #: A person's name for display (OIDC ``name``, else ``preferred_username``), when the token carries one.
    display_name: str | None = None
    _grants: Mapping[str, frozenset[Interaction]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        grants: dict[str, frozenset[Interaction]] = {}
        for scope in self.scopes:
            granted = scope_grants(scope)
            if granted is not None:
                resource_type, interactions = granted
                grants[resource_type] = grants.get(resource_type, frozenset()) | interactions
        object.__setattr__(self, "_grants", grants)

    def allows(self, resource_type: str, interaction: Interaction) -> bool:
        """True when a scope grants *interaction* on *resource_type* (by name, or by ``*`` unless the type
        is one of :data:`EXPLICIT_SCOPE_TYPES`)."""
        if interaction in self._grants.get(resource_type, ()):
            return True
        return resource_type not in EXPLICIT_SCOPE_TYPES and interaction in self._grants.get("*", ())

    def require(self, resource_type: str, interaction: Interaction) -> None:
        """Raise :class:`PermissionDeniedError` (403) naming the scope needed unless :meth:`allows`."""
        if interaction not in _ALL_INTERACTIONS:
            raise PermissionDeniedError(f"unknown interaction {interaction!r}")
        if not self.allows(resource_type, interaction):
            raise PermissionDeniedError(
                f"insufficient scope: {interaction} on {resource_type} needs scope {_required_scope(resource_type, interaction)}"
            )


def anonymous_principal() -> Principal:
    """The caller in anonymous mode: read and search on every type, no write."""
    return Principal(client_id="anonymous", subject=None, scopes=ANONYMOUS_SCOPES, anonymous=True, expires_at=None)


# ------------------------------------------------------------------------------------------ keys


@dataclass(frozen=True)
class _VerificationKey:
    """One public key of a JWK Set and the algorithms it may verify."""

    kid: str | None
    key: RSAPublicKey | EllipticCurvePublicKey
    declared_alg: str | None

    def accepts(self, alg: str) -> bool:
        if self.declared_alg is not None and self.declared_alg != alg:
            return False  # RFC 7517 §4.4 / RFC 8725 §3.1: a key declared for one algorithm is used with it only
        if isinstance(self.key, RSAPublicKey):
            return alg in _RSA_ALGORITHMS
        curve = _EC_ALGORITHM_CURVE.get(alg)
        return curve is not None and isinstance(self.key.curve, curve)


def _verification_key(jwk: jwt.PyJWK, declared_alg: object) -> _VerificationKey | str:
    """The key of *jwk*, or why it cannot verify access tokens."""
    if jwk.public_key_use not in (None, "sig"):
        return f"use {jwk.public_key_use!r} is not 'sig'"
    key = jwk.key
    if isinstance(key, RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits (at least {_MIN_RSA_BITS} needed)"
    elif isinstance(key, EllipticCurvePublicKey):
        if not isinstance(key.curve, SECP256R1 | SECP384R1):
            return f"curve {key.curve.name} is not P-256 or P-384"
    elif jwk.key_type == "oct":
        return "a symmetric (oct) key: HS256 is configured with hs256_secret only"
    elif jwk.key_type in ("RSA", "EC"):
        return "it holds a private key: publish public keys only"
    else:
        return f"key type {jwk.key_type!r} is not supported"
    alg = declared_alg if isinstance(declared_alg, str) else None
    if alg is not None and alg not in JWKS_ALGORITHMS:
        return f"declared alg {alg!r} is not one of {', '.join(JWKS_ALGORITHMS)}"
    return _VerificationKey(kid=jwk.key_id, key=key, declared_alg=alg)


def _load_jwks_file(path: Path, warnings: list[str]) -> list[_VerificationKey]:
    """The usable keys of a JWK Set file (RFC 7517 §5); unusable members are skipped with a warning."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInputError(f"fhir.auth.jwks_file {path} cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInputError(f"fhir.auth.jwks_file {path} is not a JSON document") from None
    members = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(members, list):
        raise InvalidInputError(f"fhir.auth.jwks_file {path} is not a JWK Set (no 'keys' array, RFC 7517 §5)")
    keys: list[_VerificationKey] = []
    kids: set[str | None] = set()
    for index, member in enumerate(members):
        name = f"key {index}" + (f" (kid {member.get('kid')!r})" if isinstance(member, dict) and "kid" in member else "")
        if not isinstance(member, dict):
            warnings.append(f"fhir.auth.jwks_file: {name} is not a JSON object; skipped")
            continue
        try:
            loaded = _verification_key(jwt.PyJWK(member), member.get("alg"))
        except jwt.PyJWTError:
            loaded = "it is not a valid JWK this verifier supports"
        if isinstance(loaded, str):
            warnings.append(f"fhir.auth.jwks_file: {name} skipped: {loaded}")
        elif loaded.kid in kids:
            warnings.append(f"fhir.auth.jwks_file: {name} skipped: its kid is not unique (RFC 7517 §4.5)")
        else:
            kids.add(loaded.kid)
            keys.append(loaded)
    if not keys:
        raise InvalidInputError(f"fhir.auth.jwks_file {path} holds no usable public key; " + "; ".join(warnings))
    return keys


class _JwksUrlClient(jwt.PyJWKClient):
    """:class:`jwt.PyJWKClient` that also remembers each key's declared ``alg`` from the last fetch.

    :class:`jwt.PyJWK` binds a default algorithm when a JWK declares none, and does not say which;
    the raw member does.
    """

    def __init__(self, uri: str) -> None:
        super().__init__(uri, cache_keys=False, cache_jwk_set=True, lifespan=_JWKS_LIFESPAN_SECONDS,
                         timeout=_JWKS_FETCH_TIMEOUT_SECONDS)
        self.declared_algs: dict[str, object] = {}

    def fetch_data(self) -> Any:
        data = super().fetch_data()
        members = data.get("keys") if isinstance(data, dict) else None
        self.declared_algs = {
            member["kid"]: member.get("alg")
            for member in (members if isinstance(members, list) else [])
            if isinstance(member, dict) and isinstance(member.get("kid"), str)
        }
        return data


# ------------------------------------------------------------------------------------- verifier


def is_loopback(bind: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1, ::ffff:127.x.y.z)."""
    host = bind.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """RFC 7519 §2 NumericDate: a JSON number of seconds since the epoch (not a bool or a string)."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthenticationError(f"bearer token rejected: its {name} claim is not a NumericDate (RFC 7519 §2)")
    if not 0 <= value <= _MAX_NUMERIC_DATE:
        raise AuthenticationError(f"bearer token rejected: its {name} claim is out of range")
    return float(value)


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """``scope`` (RFC 8693 §4.2, RFC 9068 §2.2.3: space-separated), else ``scp`` (a list or a string)."""
    value = claims["scope"] if "scope" in claims else claims.get("scp")
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(scope for item in value for scope in item.split())
    raise AuthenticationError("bearer token rejected: its scope claim is neither a string nor a list of strings")


def _optional_string(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise AuthenticationError(f"bearer token rejected: its {name} claim is not a non-empty string")
    return value


def _display_name(claims: Mapping[str, Any]) -> str | None:
    """OIDC ``name`` or ``preferred_username`` for display only: anything else is ignored, never refused."""
    for key in ("name", "preferred_username"):
        value = claims.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()[:128]
    return None


_JWT_ERRORS: Final[Sequence[tuple[type[jwt.PyJWTError], str]]] = (
    (jwt.InvalidSignatureError, "its signature does not verify"),
    (jwt.InvalidAudienceError, "it is not meant for this server (aud)"),
    (jwt.InvalidIssuerError, "it was not issued by the configured issuer (iss)"),
    (jwt.InvalidAlgorithmError, "its algorithm is not accepted"),
    (jwt.InvalidKeyError, "its algorithm is not accepted"),
    (jwt.DecodeError, "it is not a well-formed JWT"),
)


class TokenVerifier:
    """Turns an ``Authorization`` header into a :class:`Principal`, or refuses it (401).

    Built once at start from ``[fhir.auth]``; thread-safe (the API runs handlers in a thread pool).
    *bind* is the address the FHIR server listens on (anonymous mode needs a loopback one);
    *base_dir* resolves a relative ``jwks_file`` (the configuration file's folder); *now* is the clock
    (seconds since the epoch) for ``exp``/``nbf``/``iat`` and the cache, replaceable in tests.
    """

    def __init__(
        self,
        settings: FhirAuthSettings,
        *,
        bind: str,
        base_dir: Path | None = None,
        now: Callable[[], float] = time.time,
        cache_size: int = 1024,
    ) -> None:
        self.mode: Literal["jwt", "anonymous"] = settings.mode
        self.configured: bool
        self.warnings: list[str] = []
        self._now = now
        self._leeway = settings.leeway_seconds
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._hs256_secret = settings.hs256_secret or None
        self._file_keys: list[_VerificationKey] | None = None
        self._url_client: _JwksUrlClient | None = None
        self._cache: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()
        self._cache_size = max(0, cache_size)
        self._cache_lock = threading.Lock()

        if settings.mode == "anonymous":
            if not is_loopback(bind):
                raise InvalidInputError(
                    f"fhir.auth.mode = 'anonymous' needs a loopback fhir.bind (127.0.0.1, ::1 or localhost), not {bind!r}: "
                    "without tokens anyone who reaches the port reads every report. Use mode = 'jwt'."
                )
            self.warnings.append(f"FHIR API without authentication (fhir.auth.mode = 'anonymous') on {bind}: development only")
            if settings.jwks_file or settings.jwks_url or settings.hs256_secret:
                self.warnings.append("fhir.auth key settings are ignored in anonymous mode")
            self.configured = True
            return

        if settings.jwks_file is not None and settings.jwks_url is not None:
            raise InvalidInputError("fhir.auth: set jwks_file or jwks_url, not both")
        if settings.jwks_file is not None:
            path = settings.jwks_file if base_dir is None or settings.jwks_file.is_absolute() else base_dir / settings.jwks_file
            self._file_keys = _load_jwks_file(path, self.warnings)
        if settings.jwks_url is not None:
            url = urlparse(settings.jwks_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise InvalidInputError(f"fhir.auth.jwks_url must be an https URL, not {settings.jwks_url!r}")
            if url.scheme == "http" and not is_loopback(url.hostname):
                self.warnings.append("fhir.auth.jwks_url is plain http: the keys that decide who gets in can be tampered with")
            self._url_client = _JwksUrlClient(settings.jwks_url)
        if self._hs256_secret is not None:
            self.warnings.append("fhir.auth.hs256_secret is set: shared-secret tokens are for development only")

        missing = [
            name
            for name, value in (
                ("issuer", settings.issuer),
                ("audience", settings.audience),
                ("a key source (jwks_file, jwks_url or hs256_secret)",
                 self._file_keys or self._url_client or self._hs256_secret),
            )
            if not value
        ]
        self.configured = not missing
        if missing:
            self.warnings.append(
                "fhir.auth is not configured (missing: " + ", ".join(missing) + "): every FHIR request needing a token is refused"
            )

    @property
    def cached_tokens(self) -> int:
        """How many verified tokens the cache holds now."""
        with self._cache_lock:
            return len(self._cache)

    # ------------------------------------------------------------------ verify

    def verify(self, authorization: str | None) -> Principal:
        """The caller named by an ``Authorization`` header value (RFC 6750 §2.1), or AuthenticationError.

        Anonymous mode ignores the header. In jwt mode the token is checked as described in the module
        docstring; a token verified in the last 60 s (and not expired since) is answered from the cache.
        """
        if self.mode == "anonymous":
            return anonymous_principal()
        if not self.configured:
            raise AuthenticationError("the FHIR API cannot verify tokens: fhir.auth is not configured on this server")
        token = self._bearer_token(authorization)
        digest = hashlib.sha256(token.encode("ascii")).digest()
        now = self._now()
        with self._cache_lock:
            hit = self._cache.get(digest)
            if hit is not None:
                if now < hit[1]:
                    self._cache.move_to_end(digest)
                    return hit[0]
                del self._cache[digest]
        principal, valid_until = self._verify_token(token, now)
        if self._cache_size:
            with self._cache_lock:
                self._cache[digest] = (principal, min(valid_until, now + _CACHE_SECONDS))
                self._cache.move_to_end(digest)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return principal

    @staticmethod
    def _bearer_token(authorization: str | None) -> str:
        if authorization is None or not authorization.strip():
            raise AuthenticationError("a bearer token is required (Authorization: Bearer <token>)")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":  # RFC 7235 §2.1: the scheme is case-insensitive
            raise AuthenticationError("the Authorization header must use the Bearer scheme (RFC 6750 §2.1)")
        if not token or len(token) > _MAX_TOKEN_CHARS or not token.isascii() or any(c.isspace() for c in token):
            raise AuthenticationError("bearer token rejected: it is not a well-formed JWT")
        return token

    def _verify_token(self, token: str, now: float) -> tuple[Principal, float]:
        """Check signature, issuer, audience and times (RFC 7519 §7.2); return the principal and its expiry."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("bearer token rejected: it is not a well-formed JWT") from None
        alg = header.get("alg")
        key: Any
        if alg == "HS256" and self._hs256_secret is not None:
            key = self._hs256_secret
        elif isinstance(alg, str) and alg in JWKS_ALGORITHMS and (self._file_keys is not None or self._url_client is not None):
            key = self._jwks_key(header.get("kid"), alg)
        else:
            raise AuthenticationError("bearer token rejected: its algorithm is not accepted")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                # Times are checked below against self._now (one clock for checks and cache).
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "require": ["iss", "aud"]},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"bearer token rejected: it has no {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            reason = next((text for kind, text in _JWT_ERRORS if isinstance(exc, kind)), "it is not valid")
            raise AuthenticationError(f"bearer token rejected: {reason}") from None

        exp = _numeric_date(claims, "exp")
        if exp is None:
            raise AuthenticationError("bearer token rejected: it has no exp claim (RFC 9068 §2.2)")
        if exp <= now - self._leeway:
            raise AuthenticationError("bearer token rejected: it has expired")
        nbf = _numeric_date(claims, "nbf")
        if nbf is not None and nbf > now + self._leeway:
            raise AuthenticationError("bearer token rejected: it is not valid yet (nbf)")
        iat = _numeric_date(claims, "iat")
        if iat is not None and iat > now + self._leeway:
            raise AuthenticationError("bearer token rejected: it was issued in the future (iat)")

        subject = _optional_string(claims, "sub")
        client_id = _optional_string(claims, "client_id") or _optional_string(claims, "azp") or subject
        if client_id is None:
            raise AuthenticationError("bearer token rejected: it names no client (client_id, azp or sub)")
        principal = Principal(
            client_id=client_id,
            subject=subject,
            scopes=_scopes(claims),
            anonymous=False,
            expires_at=datetime.fromtimestamp(exp, tz=UTC),
            display_name=_display_name(claims),
        )
        return principal, exp + self._leeway

    def _jwks_key(self, kid: object, alg: str) -> RSAPublicKey | EllipticCurvePublicKey:
        """The JWK Set key the token's ``kid`` names, if it may verify *alg*."""
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("bearer token rejected: its kid header is not a string")
        candidate: _VerificationKey | None
        if self._file_keys is not None:
            if kid is None:
                candidate = self._file_keys[0] if len(self._file_keys) == 1 else None
                if candidate is None:
                    raise AuthenticationError("bearer token rejected: it names no key (kid) and the JWK Set holds several")
            else:
                candidate = next((k for k in self._file_keys if k.kid == kid), None)
        else:
            assert self._url_client is not None
            if kid is None:
                raise AuthenticationError("bearer token rejected: it names no key (kid)")
            candidate = self._url_key(self._url_client, kid)
        if candidate is None:
            raise AuthenticationError("bearer token rejected: it is signed with an unknown key (kid)")
        if not candidate.accepts(alg):
            raise AuthenticationError("bearer token rejected: its algorithm does not match its key")
        return candidate.key

    @staticmethod
    def _url_key(client: _JwksUrlClient, kid: str) -> _VerificationKey | None:
        try:
            jwk = client.match_kid(client.get_signing_keys(), kid)
        except jwt.PyJWTError:
            raise UnavailableError("the token service's JWK Set (fhir.auth.jwks_url) cannot be fetched or used") from None
        if jwk is None:
            try:
                jwk = client.get_signing_key(kid)  # one forced re-fetch, at most every 30 s (key rotation)
            except (jwt.PyJWKClientConnectionError, jwt.PyJWKSetError):
                raise UnavailableError("the token service's JWK Set (fhir.auth.jwks_url) cannot be fetched") from None
            except jwt.PyJWKClientError:
                return None
        loaded = _verification_key(jwk, client.declared_algs.get(kid))
        return None if isinstance(loaded, str) else loaded


# ----------------------------------------------------------------------------- discovery


def smart_configuration(settings: FhirAuthSettings, *, scopes_supported: Iterable[str] | None = None) -> dict[str, Any]:
    """The ``/.well-known/smart-configuration`` document (SMART App Launch 2.x, "Conformance").

    It tells a Backend Services client (SMART 2.x, "Backend Services", step 2 "Discovery") where the
    hospital's token service is and what to ask it for. ``token_endpoint`` is REQUIRED by the
    specification but only the IdP knows it: it is present when ``fhir.auth.token_endpoint`` is set,
    and the server should log that it is missing otherwise. ``issuer`` and ``jwks_uri`` are left out:
    SMART 2.x wants them only with ``sso-openid-connect``, which a resource server does not offer.
    ``token_endpoint_auth_signing_alg_values_supported`` lists RS384 and ES384, the algorithms
    ``client-confidential-asymmetric`` requires the token service to accept for client assertions.
    No ``authorization_endpoint`` nor PKCE methods: only ``client_credentials`` is advertised.
    """
    scopes = list(scopes_supported) if scopes_supported is not None else [
        "system/*.rs", "system/*.read", *(f"system/{name}.rs" for name in SERVED_RESOURCE_TYPES),
        "system/Subscription.cruds", "system/AuditEvent.rs",
    ]
    document: dict[str, Any] = {}
    if settings.token_endpoint:
        document["token_endpoint"] = settings.token_endpoint
    document.update(
        {
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": scopes,
            "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        }
    )
    return document


def mint_development_token(
    settings: FhirAuthSettings, *, client_id: str, scope: str, ttl_seconds: int = 3600, now: float | None = None
) -> str:
    """An HS256 access token signed with ``fhir.auth.hs256_secret`` (``pneumo fhir token``).

    For development and first-hour tests only: a production token comes from the hospital's
    token service (RS256/ES256 keys in ``jwks_file``/``jwks_url``). Refused when no secret,
    issuer or audience is configured, so what it mints is exactly what :meth:`TokenVerifier.verify`
    accepts.
    """
    if not settings.hs256_secret:
        raise InvalidInputError("fhir.auth.hs256_secret is not set: development tokens cannot be minted")
    if not settings.issuer or not settings.audience:
        raise InvalidInputError("fhir.auth.issuer and fhir.auth.audience must be set to mint a token")
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": settings.issuer, "aud": settings.audience, "sub": client_id, "client_id": client_id, "scope": scope,
        "iat": issued, "exp": issued + ttl_seconds, "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, settings.hs256_secret, algorithm="HS256")
