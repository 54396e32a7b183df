"""Browser sign-in with the hospital's OpenID Connect provider: authorization code flow with PKCE.

The console is an OAuth 2.0 client (RFC 6749 §4.1) of the same IdP that issues the FHIR API's
tokens; what it gets back is checked by the same :class:`~fhir_api.auth.TokenVerifier`
(signature, issuer, audience, expiry), so one configuration decides who may call the API and who
may open the console. The flow:

1. :func:`start`: a random ``state`` (CSRF on the redirect, RFC 6749 §10.12), a PKCE verifier and
   its S256 challenge (RFC 7636), and a ``nonce``; the three secrets travel in a short-lived signed
   cookie (never in the URL), the challenge and state in the redirect to the IdP.
2. :func:`exchange`: on the callback, the ``state`` must equal the cookie's; the code is exchanged
   at the token endpoint with the verifier (and the client secret, for a confidential client,
   ``client_secret_post``). The access token is returned for verification by the caller.

Tokens are never logged, stored or put in the session cookie: the session holds the subject,
the role the token's scopes grant, and the token's expiry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Final

from conf.errors import AuthenticationError, UnavailableError
from conf.settings import ConsoleOidcSettings

_TIMEOUT_SECONDS: Final = 10.0
_MAX_RESPONSE_BYTES: Final = 1 << 20


@dataclass(frozen=True)
class Pending:
    """What the callback needs to finish one sign-in (kept in a signed cookie between the two)."""

    state: str
    verifier: str
    nonce: str
    return_to: str

    def dumps(self) -> str:
        return json.dumps({"s": self.state, "v": self.verifier, "n": self.nonce, "r": self.return_to}, separators=(",", ":"))

    @staticmethod
    def loads(text: str) -> Pending | None:
        try:
            raw = json.loads(text)
            return Pending(state=str(raw["s"]), verifier=str(raw["v"]), nonce=str(raw["n"]), return_to=str(raw["r"]))
        except (ValueError, KeyError, TypeError):
            return None


def configured(settings: ConsoleOidcSettings, token_endpoint: str | None) -> bool:
    """Whether OIDC sign-in can be offered: an authorization endpoint, a token endpoint, a client id."""
    return bool(settings.authorization_endpoint and (settings.token_endpoint or token_endpoint) and settings.client_id)


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")


def start(settings: ConsoleOidcSettings, redirect_uri: str, return_to: str) -> tuple[str, Pending]:
    """The IdP URL to send the browser to, and what to remember until it comes back."""
    if not settings.authorization_endpoint or not settings.client_id:
        raise UnavailableError("OpenID Connect sign-in is not configured ([console.oidc])")
    pending = Pending(secrets.token_urlsafe(24), secrets.token_urlsafe(48), secrets.token_urlsafe(16), return_to)
    query = urllib.parse.urlencode({
        "response_type": "code", "client_id": settings.client_id, "redirect_uri": redirect_uri,
        "scope": settings.scope, "state": pending.state, "nonce": pending.nonce,
        "code_challenge": _challenge(pending.verifier), "code_challenge_method": "S256",
    })
    separator = "&" if "?" in settings.authorization_endpoint else "?"
    return f"{settings.authorization_endpoint}{separator}{query}", pending


def exchange(
    settings: ConsoleOidcSettings, token_endpoint: str, *, code: str, state: str, pending: Pending, redirect_uri: str
) -> str:
    """The access token for *code*, after checking *state* against the pending sign-in.

    :class:`AuthenticationError` for a mismatched state or a refused code (the IdP's
    ``error`` code is named, never its description, which may echo input);
    :class:`UnavailableError` when the token endpoint cannot be reached."""
    if not secrets.compare_digest(state.encode("utf-8"), pending.state.encode("utf-8")):
        raise AuthenticationError("sign-in refused: the state does not match this browser's sign-in")
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "client_id": settings.client_id or "", "code_verifier": pending.verifier}
    if settings.client_secret:
        form["client_secret"] = settings.client_secret
    request = urllib.request.Request(
        token_endpoint, data=urllib.parse.urlencode(form).encode("ascii"), method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_SECONDS) as response:  # noqa: S310 (configured https URL)
            body = response.read(_MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as exc:
        error = "unknown"
        try:
            error = str(json.loads(exc.read(_MAX_RESPONSE_BYTES)).get("error", "unknown"))[:64]
        except (ValueError, AttributeError):
            pass
        raise AuthenticationError(f"sign-in refused by the identity provider ({exc.code} {error})") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UnavailableError(f"the identity provider's token endpoint cannot be reached ({type(exc).__name__})") from None
    try:
        token = json.loads(body)["access_token"]
    except (ValueError, KeyError, TypeError):
        raise AuthenticationError("sign-in refused: the token endpoint answered without an access_token") from None
    if not isinstance(token, str) or not token:
        raise AuthenticationError("sign-in refused: the token endpoint answered without an access_token")
    return token
