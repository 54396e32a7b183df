"""The HTTP side of ``pneumo serve``: liveness and readiness now, the FHIR API mounts here later.

``/health`` answers as long as the process runs (for a liveness probe that restarts a hung
process); ``/ready`` only when the database answers, the schema is current and the listeners are
up (for a readiness probe that routes traffic).

With ``[fhir.tls]`` the port speaks HTTPS only (docs/fhir.md "TLS"), with the same BCP 195
profile as the DICOM and MLLP listeners: uvicorn gets the context of
:func:`conf.tls.server_context` through its ``ssl_context_factory`` (its own ``ssl_version`` /
``ssl_ciphers`` options cannot express "TLS 1.2 or later"), so TLS 1.0/1.1 and non-AEAD suites
are refused and, with ``require_client_cert``, a client without a certificate signed by
``ca_file`` cannot even complete the handshake.

``/metrics`` (``[metrics] enabled``) answers Prometheus with the registry the composition root
built (docs/operations.md, "Metrics"): the database projection of :mod:`storage.metrics` and
:class:`RequestMetrics`, this process's HTTP latency by route template, method and status.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import choose_encoder
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conf.tls import TlsSettings, server_context

ReadinessCheck = Callable[[], dict[str, bool]]


#: Seconds; a FHIR read is a millisecond or two, a large search page or an audit export up to seconds.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def build_app(readiness: ReadinessCheck, *, metrics: CollectorRegistry | None = None) -> FastAPI:
    """The HTTP app; with *metrics*, ``/metrics`` exposes that registry (no authentication, like
    ``/health``: its label values are codes and configured names, never PHI)."""
    app = FastAPI(title="Pneumo Gateway", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        checks = readiness()
        ok = all(checks.values())
        return JSONResponse({"status": "ready" if ok else "not-ready", "checks": checks}, status_code=200 if ok else 503)

    if metrics is not None:
        registry = metrics

        @app.get("/metrics")
        def metrics_endpoint(request: Request) -> Response:
            # A plain (sync) handler: the collectors query the database, so this runs in the thread pool.
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encoder(registry), media_type=content_type)

    return app


def instrument(app: FastAPI, registry: CollectorRegistry) -> None:
    """Time every HTTP request of *app* into *registry*. Call it after every router and middleware
    is installed: the middleware added last is the outermost, so a request refused by another
    middleware (413, 429) is timed too."""
    histogram = Histogram(
        "pneumo_http_request_duration_seconds",
        "HTTP requests served by this process (FHIR API, probes, metrics), by route template, method and status.",
        ["route", "method", "status"], registry=registry, buckets=HTTP_BUCKETS,
    )
    app.add_middleware(RequestMetrics, histogram=histogram, routes=app.router.routes)


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template of the route that serves *scope* (``/fhir/{resource_type}/{logical_id}``),
    never the path itself: a path holds resource ids, and every id would be a new time series.

    The router leaves the route it chose in the scope; a request answered before routing (a body
    refused from its Content-Length) is matched here against the routes. A path no route knows is
    ``unmatched``."""
    chosen = getattr(scope.get("route"), "path", None)
    if chosen is not None:
        return str(chosen)
    partial: str | None = None
    for route in routes:
        nested = getattr(route, "original_router", None)  # FastAPI's wrapper of an included router
        if nested is not None:
            found = route_template(nested.routes, {**scope, "route": None})
            if found != "unmatched":
                return found
            continue
        match, _ = route.matches(scope)
        path = getattr(route, "path", None)
        if match is Match.FULL and path is not None:
            return str(path)
        if match is Match.PARTIAL and partial is None and path is not None:
            partial = str(path)  # the path matched, the method did not (405)
    return partial or "unmatched"


class RequestMetrics:
    """Pure ASGI middleware (no request body buffering, streaming responses untouched): the time
    from the request to the last response byte, by route template, method and status code."""

    def __init__(self, app: ASGIApp, *, histogram: Histogram, routes: Sequence[BaseRoute]) -> None:
        self._app = app
        self._histogram = histogram
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            method = str(scope.get("method", "")).upper()
            self._histogram.labels(
                route_template(self._routes, scope), method if method in _METHODS else "other", str(status)
            ).observe(time.perf_counter() - started)


class HttpServer:
    """uvicorn in a background thread, so the DICOM node and the workers share the process."""

    def __init__(self, app: Any, host: str, port: int, *, tls: TlsSettings | None = None) -> None:
        options: dict[str, Any] = {}
        if tls is not None and tls.enabled:
            context = server_context(tls)  # built now: a bad certificate fails here, not in the thread

            def ssl_context_factory(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
                return context

            options["ssl_context_factory"] = ssl_context_factory
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on", **options)
        self.tls = tls is not None and tls.enabled
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    def start(self, timeout: float = 15.0) -> None:
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("HTTP server failed to start (port in use?)")
            self._thread.join(0.02)
            waited += 0.02
            if waited > timeout:
                raise RuntimeError("HTTP server did not start in time")

    @property
    def port(self) -> int:
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("HTTP server is not listening")

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self._server.started

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(10)
