"""Optional OpenTelemetry tracing (docs/operations.md, "Tracing").

A real ``pneumo serve`` (with its job workers in a child process) exports to a real OTLP/HTTP
receiver; a radiograph sent by C-STORE must leave one trace — ``dicom.c-store`` in the serve
process, ``inference.analyse`` in the worker process as its child (the ``traceparent`` travelled
in the job row), ``deliver.dicom`` for the SR and the summary image as children of the analysis —
with no patient name, patient ID or UID of the study in any attribute. With tracing off (the
default) the OpenTelemetry SDK is never imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from tests.conftest import copy_with_new_uids, sample
from tests.dicom_peers import StatusScp
from tests.gateway.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.gateway.serve_process import ServeProcess, write_config
from tests.inference.tiny_model import write_model_dir

CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
PATIENT_NAME = "Tracewell^Harriet"
PATIENT_ID = "PHI-TRACE-4711"


def _send(port: int, path: Path) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CR_CLASS, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(pydicom.dcmread(path))
        return int(status.Status)
    finally:
        assoc.release()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.name == name]


@pytest.mark.slow
def test_one_trace_from_c_store_through_analysis_to_delivery_across_processes(tmp_path: Path) -> None:
    def patient(ds: pydicom.Dataset) -> None:
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID

    radiograph = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in", mutate=patient)
    source = pydicom.dcmread(radiograph, stop_before_pixels=True)
    identifiers = [PATIENT_ID, "Tracewell", "Harriet", str(source.StudyInstanceUID), str(source.SeriesInstanceUID),
                   str(source.SOPInstanceUID)]
    with OtlpReceiver() as receiver, StatusScp([SR_CLASS, SC_CLASS], [EXPLICIT_LE, IMPLICIT_LE], ae_title="PACS") as pacs:
        extra = "\n".join([
            "processes = 1",  # the workers in a child process: the trace must cross processes
            "poll_interval = 0.1",
            "[inference]",
            f'model_dir = "{write_model_dir(tmp_path / "model")}"',
            "[[dicom.destinations]]", 'name = "pacs"', 'ae_title = "PACS"', 'host = "127.0.0.1"', f"port = {pacs.port}",
            "[tracing]", "enabled = true", f'otlp_endpoint = "{receiver.endpoint}"', 'service_name = "pneumo-test"',
        ])
        config = write_config(tmp_path / "pneumo.toml", tmp_path / "var", workers=True, extra=extra)
        server = ServeProcess(config, tmp_path / "serve.log").start()
        try:
            assert _send(server.dicom_port, radiograph) == 0x0000
            _wait(lambda: len(pacs.received) >= 2, 60, "the SR and the summary image at the PACS")
        finally:
            assert server.terminate() == 0  # a stop flushes what the batch processors still hold
        _wait(lambda: len(_named(receiver.spans(), "deliver.dicom")) >= 2, 20, "the delivery spans")
        spans = receiver.spans()

    [store] = _named(spans, "dicom.c-store")
    assert store.parent_span_id == ""  # a new trace starts at the C-STORE
    assert store.attributes["dicom.sop_class_uid"] == CR_CLASS
    assert store.attributes["dicom.transfer_syntax_uid"] == EXPLICIT_LE
    assert store.attributes["dicom.calling_ae"] == "TESTSCU"
    assert store.attributes["dicom.size_bytes"] > 1_000_000
    assert store.attributes["dicom.store.result"] == "stored"
    assert store.resource["service.name"] == "pneumo-test"
    assert store.resource["pneumo.process"] == "serve"

    [analyse] = _named(spans, "inference.analyse")
    assert (analyse.trace_id, analyse.parent_span_id) == (store.trace_id, store.span_id)
    assert analyse.resource["pneumo.process"] == "worker"
    assert analyse.resource["process.pid"] != store.resource["process.pid"]  # another process
    assert analyse.attributes["inference.status"] == "ok"
    assert analyse.attributes["deliveries.queued"] == 1
    stages = {span.name: span for span in spans if span.parent_span_id == analyse.span_id and span.name != "deliver.dicom"}
    assert {"inference.read", "inference.decode", "inference.preprocess", "inference.infer"} <= set(stages)
    assert all(analyse.start_ns <= stage.start_ns <= stage.end_ns for stage in stages.values())

    deliveries = _named(spans, "deliver.dicom")
    assert len(deliveries) == 2  # the SR and the summary image
    for delivery in deliveries:
        assert (delivery.trace_id, delivery.parent_span_id) == (analyse.trace_id, analyse.span_id)
        assert delivery.attributes["delivery.destination"] == "pacs"
        assert delivery.attributes["delivery.outcome"] == "delivered"
        assert delivery.resource["pneumo.process"] == "worker"

    exported = json.dumps([[span.name, span.attributes, span.resource, span.status_message, span.events]
                           for span in spans], default=str)
    for identifier in identifiers:
        assert identifier not in exported


def test_a_failed_span_names_the_exception_class_never_its_message(tmp_path: Path) -> None:
    from conf.settings import TracingSettings
    from gateway.tracing import OtelTracer

    with OtlpReceiver() as receiver:
        tracer = OtelTracer(TracingSettings(enabled=True, otlp_endpoint=receiver.endpoint), process_role="test")
        with pytest.raises(ValueError), tracer.span("inference.analyse") as span:
            span.set_attribute("job.id", 7)
            raise ValueError(f"unreadable data set of {PATIENT_NAME}")
        tracer.shutdown()
        [failed] = receiver.spans()
    assert failed.status_code == 2  # STATUS_CODE_ERROR
    assert failed.status_message == "ValueError"
    assert failed.attributes == {"job.id": 7, "error.type": "ValueError"}
    assert failed.events == ()  # no "exception" event with the message and stack trace


_DISABLED_RUN = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from tests.conftest import make_settings, copy_with_new_uids, sample
    from tests.conftest import wait_until
    from tests.dicom_node.test_storage_scp import count, send
    from storage.models import DeliveryAttempt, Job
    from tests.gateway.test_workflow import wait_for_jobs
    from tests.inference.tiny_model import write_model_dir
    from gateway.app import Gateway, build_tracer, open_runtime

    tmp = Path(sys.argv[1])
    settings = make_settings(tmp, sections={
        "inference": {"model_dir": str(write_model_dir(tmp / "model"))}, "worker": {"poll_interval": 0.1},
    }, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}])
    assert not settings.tracing.enabled  # the default
    runtime = open_runtime(settings)
    gateway = Gateway(runtime)
    gateway.start()
    try:
        assert send(gateway, copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp / "in")) == [0]
        assert len(wait_for_jobs(gateway, "infer", 1)) == 1
        # the SR's delivery attempted (nothing listens at the destination: it fails and is retried)
        wait_until(lambda: count(gateway, DeliveryAttempt) >= 1, 30, "a delivery attempt")
        with gateway.runtime.database.read_session() as session:
            payloads = [job.payload for job in session.query(Job)]
        assert payloads and not [p for p in payloads if "traceparent" in p]
    finally:
        gateway.stop()
        runtime.close()
    def loaded():
        return sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter", "gateway.tracing")))
    off = loaded()
    build_tracer(settings.model_copy(update={"tracing": settings.tracing.model_copy(update={"enabled": True})}), "check")
    print(json.dumps({"off": off, "on": loaded()}))
""")


def test_with_tracing_off_the_sdk_is_never_imported(tmp_path: Path) -> None:
    """C-STORE, analysis and the delivery attempts with the default settings, in a fresh
    interpreter; then, as the control, a tracer built with tracing on does import the SDK."""
    run = subprocess.run([sys.executable, "-c", _DISABLED_RUN, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, check=False, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    modules = json.loads(run.stdout.strip().splitlines()[-1])
    assert modules["off"] == []
    assert "opentelemetry.sdk.trace" in modules["on"] and "gateway.tracing" in modules["on"]
