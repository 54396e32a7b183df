"""Console sessions: who is signed in, for how long, and the CSRF token of their forms.

A session is a signed cookie, not a server-side table: the console is served by the one
``pneumo serve`` process, so a key made at its start (never stored) signs every cookie, and a
restart signs everyone out - the safe failure. The cookie holds a random session id, the user's
name and subject, their role and the expiry; it is ``HttpOnly`` (no script reads it),
``SameSite=Lax`` (no other site's POST form or script request carries it; Lax, not Strict, so the redirect
back from the identity provider arrives signed in), ``Path=/console`` and, on HTTPS, ``Secure``.
Signing out puts the session id on a revocation list kept until the session would have expired.

CSRF (OWASP "synchronizer token" without server state): every form carries
``HMAC(key, "csrf:" + session id)``; a state-changing request must present it, and must not come
from another origin (``Origin`` / ``Sec-Fetch-Site``). A forged form from another site has neither
the cookie (SameSite) nor the token.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Final

COOKIE_NAME: Final = "pneumo_console"
_VERSION: Final = "v1"


class Role(enum.StrEnum):
    """What a console user may do: ``read`` every page, or ``operate``: also act (retry, verify)."""

    READ = "read"
    OPERATE = "operate"


@dataclass(frozen=True)
class ConsoleUser:
    """The signed-in user of one request."""

    session_id: str
    name: str  # shown on the page and written to the audit log as the operator
    subject: str  # the IdP's stable id (``sub``), or ``dev:<name>`` for a development sign-in
    role: Role
    expires_at: float  # UNIX seconds
    via: str  # "oidc", "dev"

    @property
    def may_operate(self) -> bool:
        return self.role is Role.OPERATE


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCodec:
    """Signs and checks session cookies and CSRF tokens with one process-lifetime key."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self._revoked: dict[str, float] = {}
        self._lock = threading.Lock()

    def _mac(self, purpose: str, data: bytes) -> bytes:
        return hmac.new(self._key, purpose.encode("ascii") + b":" + data, hashlib.sha256).digest()

    def issue(self, *, name: str, subject: str, role: Role, lifetime_seconds: float, via: str, now: float | None = None) -> str:
        """A new session's cookie value."""
        now = time.time() if now is None else now
        body = json.dumps(
            {"sid": secrets.token_urlsafe(18), "name": name, "sub": subject, "role": role.value,
             "exp": int(now + lifetime_seconds), "via": via},
            separators=(",", ":"), ensure_ascii=False,
        ).encode("utf-8")
        return f"{_VERSION}.{_b64(body)}.{_b64(self._mac('session', body))}"

    def read(self, cookie: str | None, *, now: float | None = None) -> ConsoleUser | None:
        """The user of a cookie, or None when it is absent, altered, expired or signed out."""
        if not cookie or len(cookie) > 4096:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or parts[0] != _VERSION:
            return None
        try:
            body, signature = _unb64(parts[1]), _unb64(parts[2])
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(signature, self._mac("session", body)):
            return None
        try:
            claims = json.loads(body)
            user = ConsoleUser(
                session_id=str(claims["sid"]), name=str(claims["name"]), subject=str(claims["sub"]),
                role=Role(claims["role"]), expires_at=float(claims["exp"]), via=str(claims["via"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        now = time.time() if now is None else now
        if user.expires_at <= now:
            return None
        with self._lock:
            if user.session_id in self._revoked:
                return None
        return user

    def revoke(self, user: ConsoleUser, *, now: float | None = None) -> None:
        """Sign *user*'s session out (until it would have expired anyway)."""
        now = time.time() if now is None else now
        with self._lock:
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
            self._revoked[user.session_id] = user.expires_at

    def csrf_token(self, user: ConsoleUser) -> str:
        return _b64(self._mac("csrf", user.session_id.encode("ascii")))

    def csrf_valid(self, user: ConsoleUser, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(user))

    def sign(self, purpose: str, value: str) -> str:
        """*value* with a MAC for *purpose* (the short-lived OIDC state cookie)."""
        return f"{_b64(value.encode('utf-8'))}.{_b64(self._mac(purpose, value.encode('utf-8')))}"

    def unsign(self, purpose: str, signed: str | None) -> str | None:
        if not signed or "." not in signed or len(signed) > 4096:
            return None
        text, _, mac = signed.partition(".")
        try:
            value, signature = _unb64(text), _unb64(mac)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(signature, self._mac(purpose, value)):
            return None
        return value.decode("utf-8", errors="replace")
