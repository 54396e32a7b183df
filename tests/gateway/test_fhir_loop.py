"""The EHR half of the loop, end to end: C-STORE -> classifier -> study result -> FHIR, and
Subscription notifications through the outbox to a rest-hook receiver that is down, then up.

A real gateway (DICOM and HTTP listeners, workers, the tiny contract model), a real FHIR client
(fhirpy) and real signed tokens.
"""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fhirpy import SyncFHIRClient
from sqlalchemy import select

from storage.models import DeliveryAttempt, InferenceResult, Job, JobState
from tests.conftest import copy_with_new_uids, free_port, sample, wait_until
from tests.dicom_node.test_storage_scp import send
from tests.fhir_api.tokens import TokenService
from tests.inference.tiny_model import write_model_dir


def _start(gateway_factory: Any, tmp_path: Path, tokens: TokenService, **sections: Any) -> Any:
    return gateway_factory(sections={
        "inference": {"model_dir": str(write_model_dir(tmp_path / "model"))},
        "worker": {"enabled": True, "poll_interval": 0.1},
        "results": {"study_stable_seconds": 0.5},
        "fhir": {"port": 0, "bind": "127.0.0.1", "auth": tokens.auth_settings()},
        **sections,
    })


def test_a_stored_radiograph_is_found_by_patient_with_its_observation(gateway_factory: Any, tmp_path: Path) -> None:
    tokens = TokenService(tmp_path / "idp")
    gateway = _start(gateway_factory, tmp_path, tokens)
    path = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in")
    source = pydicom.dcmread(path, stop_before_pixels=True)
    assert send(gateway, path) == [0]

    base = f"http://127.0.0.1:{gateway.http.port}/fhir"
    client = SyncFHIRClient(base, authorization=f"Bearer {tokens.token('system/*.rs')}")
    patient = wait_until(lambda: client.resources("Patient").search(identifier=str(source.PatientID)).first(), what="Patient")
    report = wait_until(
        lambda: client.resources("DiagnosticReport").search(patient=patient.id, status="final").first(), what="final report"
    )
    assert report["imagingStudy"][0]["reference"] == f"ImagingStudy/{source.StudyInstanceUID}"

    raw = client.resources("DiagnosticReport").search(patient=patient.id).include("DiagnosticReport", "result").fetch_raw()
    observations = [e.resource for e in raw.entry if e.resource.resourceType == "Observation"]
    assert len(observations) == 1
    observation = observations[0]
    with gateway.runtime.database.read_session() as session:
        result = session.execute(select(InferenceResult)).scalar_one()
    present = observation["valueCodeableConcept"]["coding"][0]["code"]
    assert present == ("52101004" if (result.probability or 0) >= (result.threshold or 1) else "272519000")
    percent = observation["component"][0]["valueQuantity"]["value"]
    assert percent == pytest.approx(100 * (result.probability or 0), abs=0.01)
    assert observation["device"]["reference"].startswith("Device/")
    device = client.reference("Device", observation["device"]["reference"].split("/", 1)[1]).to_resource()
    assert device["resourceType"] == "Device"

    # presentedForm links to our DICOM SR, served as Binary.
    link = next(a["url"] for a in report["presentedForm"] if a["contentType"] == "application/dicom")
    binary = httpx.get(f"{base}/{link}", headers=tokens.headers("system/Binary.r"), timeout=10)
    assert binary.status_code == 200 and binary.headers["content-type"] == "application/dicom"
    sr = pydicom.dcmread(io.BytesIO(binary.content))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == source.StudyInstanceUID


class _Receiver:
    """A rest-hook endpoint: records every PUT it accepts."""

    def __init__(self, port: int) -> None:
        received: list[tuple[str, dict[str, Any]]] = []
        self.received = received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()




def test_a_receiver_that_was_down_gets_every_notification_once(gateway_factory: Any, tmp_path: Path) -> None:
    tokens = TokenService(tmp_path / "idp")
    gateway = _start(gateway_factory, tmp_path, tokens,
                     delivery={"backoff_base_seconds": 0.2, "backoff_cap_seconds": 0.5, "max_attempts": 100})
    port = free_port()
    subscription = {
        "resourceType": "Subscription", "status": "requested", "reason": "EHR result inbox",
        "criteria": "DiagnosticReport?status=final",
        "channel": {"type": "rest-hook", "endpoint": f"http://127.0.0.1:{port}/fhir", "payload": "application/fhir+json",
                    "header": ["Authorization: Bearer ehr-inbox-secret"]},
    }
    base = f"http://127.0.0.1:{gateway.http.port}/fhir"
    created = httpx.post(f"{base}/Subscription", content=json.dumps(subscription), timeout=10, headers={
        **tokens.headers("system/Subscription.cruds"), "Content-Type": "application/fhir+json"})
    assert created.status_code == 201, created.text

    studies = [copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in" / str(n)) for n in range(3)]
    assert send(gateway, *studies) == [0, 0, 0]

    def failed_attempts() -> int:
        with gateway.runtime.database.read_session() as session:
            rows = session.execute(select(DeliveryAttempt).where(DeliveryAttempt.channel == "fhir-subscription")).scalars()
            return len({a.subject for a in rows if a.outcome == "failed"})

    wait_until(lambda: failed_attempts() >= 3, what="every notification to fail while the receiver is down")
    receiver = _Receiver(port)
    try:
        def all_delivered() -> bool:
            with gateway.runtime.database.read_session() as session:
                jobs = session.execute(select(Job).where(Job.kind == "deliver")).scalars().all()
            notifications = [j for j in jobs if j.payload["channel"] == "fhir-subscription"]
            return len(notifications) == 3 and all(j.state == JobState.DONE for j in notifications)

        wait_until(all_delivered, what="the notifications to be delivered")
        time.sleep(1.0)  # nothing more may arrive
    finally:
        receiver.stop()
    counts = Counter((path, body["meta"]["versionId"]) for path, body in receiver.received)
    assert len(counts) == 3 and set(counts.values()) == {1}  # each report version exactly once
    assert all(path.startswith("/fhir/DiagnosticReport/") for path, _ in receiver.received)
    assert {body["status"] for _, body in receiver.received} == {"final"}
