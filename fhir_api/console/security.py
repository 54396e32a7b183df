"""HTTP response headers for every console response (OWASP Secure Headers), as ASGI middleware.

* ``Content-Security-Policy``: scripts, styles and images from this origin only - no inline
  script or style, no ``eval``, no frames, forms post only here. The console is written for it:
  charts are SVG, the small script is a file.
* ``Cache-Control: no-store`` on every page and image (they hold PHI; a shared workstation's
  browser cache must not keep them); static assets, which hold none, may be cached for a day.
* ``X-Frame-Options``/``frame-ancestors`` (clickjacking), ``nosniff``, ``Referrer-Policy:
  same-origin`` (a study URL names a Study Instance UID: no other site is told it; ``no-referrer``
  would also make Chromium send ``Origin: null`` on our own form posts, which the CSRF check must
  refuse), ``Cross-Origin-Opener-Policy``.
"""

from __future__ import annotations

from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_COMMON: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode("ascii")),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
)
_NO_STORE: Final = ((b"cache-control", b"no-store"), (b"pragma", b"no-cache"))
_STATIC: Final = ((b"cache-control", b"public, max-age=86400"),)


class ConsoleHeaders:
    """Adds the headers above to responses under *prefix* (replacing any the route set)."""

    def __init__(self, app: ASGIApp, *, prefix: str = "/console", static_prefix: str = "/console/static/") -> None:
        self._app = app
        self._prefix = prefix
        self._static = static_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or not (path == self._prefix or path.startswith(self._prefix + "/")):
            await self._app(scope, receive, send)
            return
        added = _COMMON + (_STATIC if path.startswith(self._static) else _NO_STORE)
        names = {name for name, _ in added}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": [*kept, *added]}
            await send(message)

        await self._app(scope, receive, send_with_headers)
