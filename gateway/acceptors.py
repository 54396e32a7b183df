"""Extra DICOM acceptor processes (``dicom.acceptor_processes`` > 1).

pynetdicom handles every PDU in Python, so the associations of one process share one GIL: on a
2-core node, 4 associations into one process ingest slower than 2 into each of 2 processes
(measured: 22 vs 37 instances/s). ``pneumo serve`` therefore starts N-1 children that bind the
same port with SO_REUSEPORT and run only the DICOM node (ingest and Q/R); the parent keeps the
HTTP server and the workers, which pick up the children's jobs from the shared database.

A child exits when told to (SIGTERM, forwarded by the parent's graceful stop) or when its parent
disappears (SIGKILL of the parent): it polls its parent PID, finishes in-flight associations and
stops, so a crashed gateway never leaves orphan listeners on the port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class AcceptorProcesses:
    def __init__(self, config: Path | None, port: int, count: int) -> None:
        self._config = config
        self._port = port
        self._count = count
        self._children: list[subprocess.Popen[str]] = []

    def start(self, timeout: float = 60.0) -> None:
        """Start the children and wait until each one listens."""
        env = {**os.environ, "PNEUMO_DICOM__PORT": str(self._port), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "gateway.cli"]
        if self._config is not None:
            command += ["--config", str(self._config)]
        for _ in range(self._count):
            child = subprocess.Popen([*command, "acceptor", "--parent", str(os.getpid())],
                                     stdout=subprocess.PIPE, text=True, env=env)
            self._children.append(child)
        for child in self._children:
            if not _wait_ready(child, timeout):
                self.stop()
                raise RuntimeError("a DICOM acceptor process did not start (see its log lines)")
        log.info("dicom.acceptors_started", processes=len(self._children) + 1, port=self._port)

    @property
    def running(self) -> bool:
        return all(child.poll() is None for child in self._children)

    def stop(self, grace_seconds: float = 40.0) -> None:
        for child in self._children:
            if child.poll() is None:
                child.terminate()
        for child in self._children:
            try:
                child.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(10)
        self._children.clear()


def _wait_ready(child: subprocess.Popen[str], timeout: float) -> bool:
    ready = threading.Event()

    def _read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            try:
                if json.loads(line).get("event") == "ready":
                    ready.set()
            except ValueError:
                continue

    threading.Thread(target=_read, daemon=True).start()
    return ready.wait(timeout) and child.poll() is None


def parent_alive(parent_pid: int) -> bool:
    """True while the process that started us is still our parent."""
    return os.getppid() == parent_pid
