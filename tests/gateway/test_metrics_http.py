"""``/metrics`` of a real ``pneumo serve`` (in-process gateway, real listeners on free ports),
scraped over HTTP and parsed with prometheus_client's parser: what a C-STORE, an HL7 order and
FHIR requests leave behind, labelled without identifiers; and ``[metrics] enabled = false``."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pydicom
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from sqlalchemy import select

from storage.models import Instance
from tests.conftest import copy_with_new_uids, sample, wait_until
from tests.hl7.test_messages import ORM_231

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
FHIR = {"port": 0, "auth": {"mode": "anonymous"}}
HL7 = {"port": 0, "peers": [{"sending_application": "RIS", "sending_facility": "RADIOLOGY", "host": "127.0.0.1"}]}


def scrape(port: int) -> tuple[httpx.Response, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    return response, samples


def hl7_exchange(port: int, message: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(VT + message.encode() + FS + CR)
        reply = b""
        while not reply.endswith(FS + CR):
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.strip(VT + FS + CR).decode()


def c_store(port: int, path: Path) -> int:
    ae = AE(ae_title="STORESCU")
    dataset = pydicom.dcmread(path)
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
        return int(status.Status)
    finally:
        assoc.release()


def test_metrics_after_dicom_hl7_and_fhir_traffic(gateway_factory: Callable[..., Any], tmp_path: Path) -> None:
    gateway = gateway_factory(sections={"fhir": FHIR, "hl7": HL7})
    port = gateway.http.port
    source = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    stored = pydicom.dcmread(source)
    assert c_store(gateway.dicom.port, source) == 0x0000
    ack = hl7_exchange(gateway.hl7.port, ORM_231)
    assert "MSA|AA" in ack
    missing_id = "no-such-report-8f3a91"
    assert httpx.get(f"http://127.0.0.1:{port}/fhir/DiagnosticReport/{missing_id}", timeout=10).status_code == 404
    assert httpx.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=10).status_code == 200

    association = ("pneumo_dicom_associations_total", (("calling_ae", "STORESCU"), ("end", "released")))

    def hl7_counted() -> Any:
        # The association's row is written once it has ended, from its connection's thread.
        response, samples = scrape(port)
        hl7 = samples.get(("pneumo_hl7_messages_total", (("ack", "AA"), ("type", "ORM^O01"))))
        return (response, samples) if hl7 and samples.get(association) else None

    response, samples = wait_until(hl7_counted, timeout=20, what="the HL7 message and the association in /metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert samples[("pneumo_instances_stored_total", (("origin", "received"),))] == 1
    with gateway.runtime.database.read_session() as session:
        size = session.execute(select(Instance.size)).scalar_one()  # as stored (the file meta rewritten)
    assert samples[("pneumo_instance_bytes_total", (("origin", "received"),))] == size
    read = ("pneumo_http_request_duration_seconds_count",
            (("method", "GET"), ("route", "/fhir/{resource_type}/{logical_id}"), ("status", "404")))
    assert samples[read] == 1
    assert samples[("pneumo_http_request_duration_seconds_count",
                    (("method", "GET"), ("route", "/fhir/metadata"), ("status", "200")))] == 1
    assert samples[("pneumo_audit_events_total", (("event", "DICOM Instances Transferred"), ("outcome", "success")))] == 1
    assert samples[association] == 1
    assert samples[("pneumo_dicom_association_seconds_count", (("calling_ae", "STORESCU"),))] == 1
    assert samples[("pneumo_metrics_database_up", ())] == 1
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)
    # No identifier of the patient, the study, the instance or the FHIR resource reaches a label.
    for secret in [missing_id, str(stored.PatientName), str(stored.PatientID), stored.StudyInstanceUID,
                   stored.SOPInstanceUID, "EVERYMAN", "PHI4711", "RIS000123"]:
        assert secret not in response.text, secret


def test_openmetrics_when_asked(gateway_factory: Callable[..., Any]) -> None:
    gateway = gateway_factory(sections={"fhir": FHIR})
    response = httpx.get(f"http://127.0.0.1:{gateway.http.port}/metrics", timeout=10,
                         headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_metrics_can_be_turned_off(gateway_factory: Callable[..., Any]) -> None:
    gateway = gateway_factory(sections={"fhir": FHIR, "metrics": {"enabled": False}})
    assert gateway.metrics is None
    assert httpx.get(f"http://127.0.0.1:{gateway.http.port}/metrics", timeout=10).status_code == 404
    assert httpx.get(f"http://127.0.0.1:{gateway.http.port}/health", timeout=10).status_code == 200


def test_a_request_refused_before_routing_is_labelled_with_its_route(gateway_factory: Callable[..., Any]) -> None:
    """The body limit answers 413 from Content-Length before the router runs: the template is
    found by matching, so the id in the path still does not become a label."""
    gateway = gateway_factory(sections={"fhir": {**FHIR, "max_request_bytes": 1024}})
    port = gateway.http.port
    response = httpx.put(f"http://127.0.0.1:{port}/fhir/Subscription/sub-secret-77", content=b"{" + b" " * 4096 + b"}",
                         headers={"Content-Type": "application/fhir+json"}, timeout=10)
    assert response.status_code == 413
    text, samples = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text, scrape(port)[1]
    assert samples[("pneumo_http_request_duration_seconds_count",
                    (("method", "PUT"), ("route", "/fhir/{resource_type}/{logical_id}"), ("status", "413")))] == 1
    assert "sub-secret-77" not in text
