"""``pneumo serve`` with ``[audit.syslog]``: its audit log reaches an Audit Record Repository (a real
syslog-over-TLS receiver, mutual TLS), from the Application Start record to the Application Stop."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from audit.models import AuditRecord
from conf.dev_pki import make_dev_pki
from tests.audit.syslog_receiver import SyslogMessage, TlsSyslogReceiver
from tests.conftest import wait_until


def _event_type(message: SyslogMessage) -> tuple[str | None, str | None]:
    root = ET.fromstring(message.msg)
    event = root.find("EventIdentification")
    assert event is not None
    event_id, event_type = event.find("EventID"), event.find("EventTypeCode")
    return (
        event_id.get("csd-code") if event_id is not None else None,
        event_type.get("csd-code") if event_type is not None else None,
    )


def test_serve_forwards_its_audit_log_from_start_to_stop(gateway_factory: Callable[..., Any], tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki")
    receiver = TlsSyslogReceiver(pki.server_cert, pki.server_key, pki.ca_cert).start()
    try:
        gateway = gateway_factory(
            sections={
                "audit": {
                    "syslog": {
                        "enabled": True,
                        "host": "127.0.0.1",
                        "port": receiver.port,
                        "tls": {"cert_file": pki.client_cert, "key_file": pki.client_key, "ca_file": pki.ca_cert},
                        "poll_interval_seconds": 0.1,
                    }
                }
            }
        )
        [start] = receiver.wait_for(1)
        assert _event_type(start) == ("110100", "110120")  # Application Activity, Application Start
        assert (start.facility, start.severity, start.msgid) == (10, 5, "IHE+RFC-3881")
        forwarder = gateway.audit_forwarder
        wait_until(lambda: forwarder.status().lag == 0, 10, "caught up")

        gateway.stop()  # writes Application Stop, then the forwarder sends it before it stops
        messages = receiver.wait_for(2)
        assert _event_type(messages[-1]) == ("110100", "110121")  # Application Stop
        with gateway.runtime.database.read_session() as session:
            count = len(session.execute(select(AuditRecord.seq)).all())
        assert len(messages) == count  # every record of the log, once
        cursor = gateway.runtime.settings.audit_forward_cursor_file
        assert cursor.is_file() and f'"seq":{count}' in cursor.read_text()
    finally:
        receiver.stop()
