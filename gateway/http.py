"""The HTTP side of ``pneumo serve``: liveness and readiness now, the FHIR API mounts here later.

``/health`` answers as long as the process runs (for a liveness probe that restarts a hung
process); ``/ready`` only when the database answers, the schema is current and the listeners are
up (for a readiness probe that routes traffic).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

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

    def __init__(self, app: Any, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
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
