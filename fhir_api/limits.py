"""Limits against abuse of the FHIR API: request body size and request rate per client.

* **Body size** (``[fhir] max_request_bytes``): :class:`BodyLimit`, an ASGI middleware in front of
  ``/fhir``, answers 413 Payload Too Large (RFC 9110 §15.5.14) with an OperationOutcome when the
  declared ``Content-Length`` is too large, before reading anything; a body without a length
  (chunked) is counted as it is read and refused the moment it passes the limit, so no more than
  the limit is ever buffered.
* **Rate** (``[fhir] requests_per_second``, ``request_burst``): a token bucket per client. The key
  is the verified token's client id (what the audit trail records), else the caller's address: in
  anonymous mode, and for a request whose token is refused, so a flood of bad tokens is throttled
  per address rather than writing one User Authentication record each. Beyond the rate: 429 Too
  Many Requests (RFC 6585 §4) with ``Retry-After`` and an OperationOutcome (issue type
  ``throttled``).

Every breach is answered with its status; at most one PS3.15 A.5.3.11 Security Alert and one WARN
line per (client, kind) per minute is written (:class:`audit.alert_throttle.AlertThrottle`),
which says how many were refused since the previous one. Logs name the client id or address and
the limit, never the request's content.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from conf.errors import PneumoError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RATE_LIMITED = "request-rate"
BODY_TOO_LARGE = "request-size"


class TooManyRequestsError(PneumoError):
    """The client used up its request rate (429; ``retry_after`` whole seconds)."""

    retryable = True

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PayloadTooLargeError(PneumoError):
    """The request body is larger than ``[fhir] max_request_bytes`` (413)."""


class RateLimiter:
    """Token buckets per key: *rate* tokens a second, at most *burst* stored; thread-safe.

    The table is bounded (least recently used keys forgotten first): a forgotten key starts with a
    full bucket, which only ever errs towards letting a request through.
    """

    def __init__(
        self, rate: float, burst: int, *, max_keys: int = 10000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, time]

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """Spend one token of *key*: 0.0 when allowed, else the seconds until one is available."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = [self.burst, now]
                while len(self._buckets) > self._max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
                bucket[1] = now
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return 0.0
            return (1.0 - bucket[0]) / self.rate


def retry_after_seconds(wait: float) -> int:
    """The ``Retry-After`` value (RFC 9110 §10.2.3: whole seconds) for a wait of *wait* seconds."""
    return max(1, math.ceil(wait))


class BodyLimit:
    """ASGI middleware: request bodies under *prefix* are at most *max_bytes* long.

    *on_breach(scope)* is called once per refused request (for the alert); *refuse(scope)* builds
    the 413 response when the declared length is too large. A body that turns out too large while
    being read raises :class:`PayloadTooLargeError` from ``receive``, which the application's
    handler turns into the same 413.
    """

    def __init__(
        self,
        app: AsgiApp,
        *,
        max_bytes: int,
        refuse: Callable[[Scope], AsgiApp],
        on_breach: Callable[[Scope], None],
        prefix: str = "/fhir",
    ) -> None:
        self._app = app
        self._max = max_bytes
        self._refuse = refuse
        self._on_breach = on_breach
        self._prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self._prefix):
            await self._app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self._max:
            self._on_breach(scope)
            await self._refuse(scope)(scope, receive, send)
            return
        await self._app(scope, self._counting(scope, receive), send)

    def _counting(self, scope: Scope, receive: Receive) -> Receive:
        seen = 0
        limit = self._max
        on_breach = self._on_breach

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    on_breach(scope)
                    raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
            return message

        return counted


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length itself
    return None
