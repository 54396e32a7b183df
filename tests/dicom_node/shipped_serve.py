"""``pneumo serve`` with the shipped ``pneumo.toml`` (two acceptor processes, loopback, its peers
and permissions), moved to free ports and a temporary data directory by environment overrides,
for the adversarial tests of the DICOM listener."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, select

from audit.models import AuditRecord
from tests.gateway.serve_process import ServeProcess

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "pneumo.toml"


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServeProcess]:
    """The real ``pneumo serve`` on the shipped configuration; only ports, data and workers differ."""
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("PNEUMO_DICOM__PORT", "0")
    monkeypatch.setenv("PNEUMO_FHIR__PORT", "0")
    monkeypatch.setenv("PNEUMO_WORKER__ENABLED", "false")
    monkeypatch.setenv("PNEUMO_LOG__FORMAT", "json")
    server = ServeProcess(SHIPPED_CONFIG, tmp_path / "serve.log").start(timeout=120)
    try:
        yield server
    finally:
        try:
            server.terminate(timeout=60)
        finally:
            server.kill()


def echo(port: int, calling: str = "ECHOSCU", called: str = "PNEUMO") -> int | None:
    """One real association with a C-ECHO; the status, or None when not associated."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def security_alerts(data_dir: Path) -> list[dict[str, Any]]:
    """The PS3.15 A.5.3.11 Security Alert records (EventID 110113) in the server's audit log."""
    engine = create_engine(f"sqlite:///{data_dir / 'pneumo.db'}")
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(AuditRecord.event).where(AuditRecord.event_id == "110113").order_by(AuditRecord.seq)
            )
            return [dict(row[0]) for row in rows]
    finally:
        engine.dispose()


def wait_closed(sockets: list[socket.socket], timeout: float) -> dict[int, float]:
    """Read each socket until the server closes it; index -> seconds it stayed open (from now)."""
    start = time.monotonic()
    closed: dict[int, float] = {}
    for sock in sockets:
        sock.setblocking(False)
    while len(closed) < len(sockets) and time.monotonic() - start < timeout:
        for index, sock in enumerate(sockets):
            if index in closed:
                continue
            try:
                if sock.recv(65536) == b"":
                    closed[index] = time.monotonic() - start
            except BlockingIOError:
                continue
            except OSError:  # reset by the server
                closed[index] = time.monotonic() - start
        time.sleep(0.05)
    return closed
