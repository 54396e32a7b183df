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
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from conf.tls import TlsSettings, server_context

ReadinessCheck = Callable[[], dict[str, bool]]


def build_app(readiness: ReadinessCheck) -> FastAPI:
    app = FastAPI(title="Pneumo Gateway", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        checks = readiness()
        ok = all(checks.values())
        return JSONResponse({"status": "ready" if ok else "not-ready", "checks": checks}, status_code=200 if ok else 503)

    return app


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
