"""HL7 v2 end to end: orders in over MLLP, images over DICOM, ORU^R01 out to an EHR over MLLP.

A real gateway (DICOM, HTTP and MLLP listeners, workers, the tiny contract model); a plain-socket
MLLP peer plays the RIS (orders) and another the EHR (results, answering AA). Orders arrive
before the images for one study and after them for another; the EHR is down at first and comes
back; a late image makes a corrected ORU. Every ORU parses with hl7apy at strict validation.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message
from hl7apy.validation import Validator
from sqlalchemy import select

from hl7.messages import parse_ack
from storage.models import DeliveryAttempt, Job, JobState
from tests.conftest import copy_with_new_uids, free_port, sample, wait_until
from tests.dicom_node.test_storage_scp import send
from tests.hl7.test_messages import OMI_251, ORM_231
from tests.inference.tiny_model import write_model_dir

VT, FS, CR = b"\x0b", b"\x1c", b"\r"




def _exchange(port: int, message: str) -> str:
    """The RIS: one message over a plain socket, the reply frame's payload."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(VT + message.encode() + FS + CR)
        reply = b""
        while not reply.endswith(FS + CR):
            chunk = conn.recv(65536)
            assert chunk, "the gateway closed the connection without an ACK"
            reply += chunk
    return reply[1:-2].decode()


class Ehr:
    """The EHR's interface engine: a plain-socket MLLP server answering AA, recording every message."""

    def __init__(self, port: int) -> None:
        self.messages: list[str] = []
        self._server = socket.create_server(("127.0.0.1", port))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                buffer = b""
                while not buffer.endswith(FS + CR):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buffer += chunk
                if not buffer.endswith(FS + CR):
                    continue
                text = buffer[1:-2].decode()
                self.messages.append(text)
                control = text.split("\r", 1)[0].split("|")[9]
                ack = f"MSH|^~\\&|EHR|HOSP|PNEUMO|RAD|20261130120000||ACK^R01^ACK|A{control}|P|2.5.1\rMSA|AA|{control}"
                conn.sendall(VT + ack.encode() + FS + CR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()




def _order(template: str, accession: str, placer: str, control_id: str) -> str:
    """The sample order with our accession, placer number and control id."""
    text = template.replace("RIS|RADIOLOGY|", "RIS|HOSP|", 1)
    for old in ("ACC-2024-001", "ACC-88"):
        text = text.replace(old, accession)
    for old in ("PO-2024-001", "PO-88"):
        text = text.replace(old, placer)
    for old in ("RIS000123", "RIS000888"):
        text = text.replace(old, control_id)
    return text


def _accession(value: str) -> Callable[[pydicom.Dataset], None]:
    def mutate(ds: pydicom.Dataset) -> None:
        ds.AccessionNumber = value
    return mutate


def _segment(message: str, segment_id: str) -> list[str]:
    line = next(s for s in message.split("\r") if s.startswith(segment_id + "|"))
    return line.split("|")


def _strictly_valid(message: str, tmp_path: Path) -> Message:
    parsed = parse_message(message, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert Validator.validate(parsed, report_file=str(tmp_path / "hl7apy-report.txt")) is True
    return parsed


def test_orders_images_and_results_in_any_order_with_the_ehr_down_then_up(gateway_factory: Any, tmp_path: Path) -> None:
    ehr_port = free_port()
    gateway = gateway_factory(sections={
        "inference": {"model_dir": str(write_model_dir(tmp_path / "model"))},
        "worker": {"enabled": True, "poll_interval": 0.1},
        "results": {"study_stable_seconds": 0.5},
        "delivery": {"backoff_base_seconds": 0.2, "backoff_cap_seconds": 0.5, "max_attempts": 200},
        "hl7": {"port": 0, "peers": [{"sending_application": "RIS", "sending_facility": "HOSP", "host": "127.0.0.1"}],
                "destinations": [{"name": "ehr", "host": "127.0.0.1", "port": ehr_port,
                                  "receiving_application": "EHR", "receiving_facility": "HOSP"}]},
    })
    assert gateway.hl7 is not None
    hl7_port = gateway.hl7.port

    # Study 1: the order first (ORM^O01, v2.3.1), then the image.
    assert parse_ack(_exchange(hl7_port, _order(ORM_231, "ACCHL71", "PO-HL7-1", "CTL1")))[0] == "AA"
    first = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in1", mutate=_accession("ACCHL71"))
    # Study 2: the image first, then the order (OMI^O23, v2.5.1) while the EHR is still down.
    second = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in2", mutate=_accession("ACCHL72"))
    assert send(gateway, first, second) == [0, 0]

    def failed_subjects() -> set[str]:
        with gateway.runtime.database.read_session() as session:
            rows = session.execute(select(DeliveryAttempt).where(DeliveryAttempt.channel == "hl7")).scalars()
            return {a.subject for a in rows if a.outcome == "failed"}

    wait_until(lambda: len(failed_subjects()) >= 2, what="both ORUs to fail while the EHR is down")
    assert parse_ack(_exchange(hl7_port, _order(OMI_251, "ACCHL72", "PO-HL7-2", "CTL2")))[0] == "AA"
    # The same order resent (lost ACK): the same answer, nothing new.
    assert parse_ack(_exchange(hl7_port, _order(OMI_251, "ACCHL72", "PO-HL7-2", "CTL2")))[0] == "AA"

    ehr = Ehr(ehr_port)
    try:
        def delivered() -> bool:
            with gateway.runtime.database.read_session() as session:
                jobs = session.execute(select(Job).where(Job.kind == "deliver")).scalars().all()
            results = [j for j in jobs if j.payload["channel"] == "hl7"]
            return len(results) == 2 and all(j.state == JobState.DONE for j in results)

        wait_until(delivered, what="both ORUs to be delivered")
        by_accession = {_segment(m, "OBR")[18]: m for m in ehr.messages}
        assert len(ehr.messages) == 2 and set(by_accession) == {"ACCHL71", "ACCHL72"}  # one ORU per study result
        for accession, placer in (("ACCHL71", "PO-HL7-1"), ("ACCHL72", "PO-HL7-2")):
            oru = by_accession[accession]
            _strictly_valid(oru, tmp_path)
            assert _segment(oru, "OBR")[2].split("^")[0] == placer  # matched to its order, either arrival order
            assert _segment(oru, "OBR")[25] == "F"
            assert _segment(oru, "PID")[3].split("^")[0] == "PHI4711"  # the EHR's patient id, from the order
            finding = _segment(oru, "OBX")
            assert finding[3].startswith("233604007^") and finding[5].split("^")[0] in ("52101004", "272519000")

        # A late image in study 1: one corrected ORU.
        source = pydicom.dcmread(first, stop_before_pixels=True)
        late = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in3", study_uid=str(source.StudyInstanceUID),
                                  mutate=_accession("ACCHL71"))
        assert send(gateway, late) == [0]
        wait_until(lambda: len(ehr.messages) == 3, what="the corrected ORU")
        time.sleep(1.0)  # nothing more may arrive
        assert len(ehr.messages) == 3
        corrected = ehr.messages[2]
        _strictly_valid(corrected, tmp_path)
        assert _segment(corrected, "OBR")[18] == "ACCHL71" and _segment(corrected, "OBR")[25] == "C"
        controls = [_segment(m, "MSH")[9] for m in ehr.messages]
        assert len(set(controls)) == 3
    finally:
        ehr.close()


def test_unknown_sender_is_rejected(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(sections={"hl7": {"port": 0, "peers": [
        {"sending_application": "RIS", "sending_facility": "HOSP", "host": "127.0.0.1"}]}})
    code, control, _ = parse_ack(_exchange(gateway.hl7.port, ORM_231))  # RIS|RADIOLOGY: not a peer
    assert code == "AR" and control == "RIS000123"
