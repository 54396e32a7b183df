"""Attacks and faults against the real ``pneumo serve``: PHI never reaches its output, a bad
demographic value does not stop the analysis of a good image, and a 1×1-pixel "chest X-ray" is
not classified (issue "Keep every promise under attack and faults", rows 12–14;
docs/architecture.md §3 step 3, §5).

One server run (DEBUG logging, workers on, the small contract-test model) receives, over DICOM
from DCMTK ``storescu``:

* a valid chest radiograph with recognisable PHI and a Patient's Birth Date written
  ``05/04/1923`` (not a DA, PS3.5 §6.2) — it must still get an ``ok`` result and an SR;
* a radiograph whose Study Time has a malformed Value Length that swallows the following
  elements up to and including the Accession Number (crafted in the raw bytes) — pydicom then
  quotes the swallowed bytes in warnings and exceptions;
* a 1×1-pixel DX chest image — not applicable, with the rule named, and no SR.

Over HL7 (MLLP, issue "A HIPAA audit trail you can prove", the PHI test), the same patient's
order arrives first (ORM^O01 with the name, MRN, birth date and accession), one malformed order
quotes PHI in a field that fails validation (answered AE/AR), and the ORU^R01 with the result goes
out to an EHR's MLLP receiver, which answers AA.

Everything the server writes (stdout and stderr), and what the ``pneumo`` commands used to
inspect it write to stderr, must be free of every PHI string.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from hl7.messages import parse_ack
from tests.conftest import copy_with_new_uids, dcmtk, free_port, sample, wait_until
from tests.gateway.serve_process import pneumo, write_config
from tests.gateway.test_hl7_loop import Ehr, _exchange, _order
from tests.hl7.test_messages import ORM_231
from tests.inference.tiny_model import write_model_dir

pytestmark = pytest.mark.slow

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
NAME = "Zyxwvut^Qpalzm"
PATIENT_ID = "MRN8675309"
BAD_BIRTH_DATE = "05/04/1923"
ACCESSION = "ACC5551212"
REFERRER = "Wqoplkmn"  # one PN component: highdicom warns, quoting it (a Python warning)
SWALLOWED_ACCESSION = "ACC7774242"
BIRTH_DATE = "19230405"  # the order's (HL7 DT): the image's own is the malformed one above
PHI = (NAME, "Zyxwvut", "Qpalzm", PATIENT_ID, BAD_BIRTH_DATE, "05/04", BIRTH_DATE, ACCESSION, SWALLOWED_ACCESSION,
       REFERRER)


@dataclass
class Served:
    output: str  # the server's stdout + stderr, and the inspecting commands' stderr
    studies: dict[str, dict[str, object]]  # by Study Instance UID
    instances: list[dict[str, object]]
    bad_birth_date_study: str
    swallowed_study: str
    fhir: dict[str, int]
    tiny_study: str
    hl7_acks: list[str]  # MSA-1 of each order sent
    oru: list[str]  # the ORU^R01 messages the EHR received


def _with_phi(accession: str, birth_date: str | None) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        ds.PatientName = NAME
        ds.PatientID = PATIENT_ID
        ds.AccessionNumber = accession
        ds.ReferringPhysicianName = REFERRER
        if birth_date is not None:
            ds.PatientBirthDate = birth_date
    return mutate


def _swallowing_accession(directory: Path) -> Path:
    """A radiograph whose Study Time Value Length covers the elements up to the Accession Number.

    Explicit VR Little Endian: tag (4) + VR (2) + 16-bit length (2). Study Time (0008,0030)
    precedes Accession Number (0008,0050); its length is stretched to end exactly where the
    accession value ends, so the file still parses (DCMTK sends it) but the accession is gone and
    its bytes sit inside a "TM" value.
    """
    path = copy_with_new_uids(sample("RG1_UNCR.dcm"), directory, mutate=_with_phi(SWALLOWED_ACCESSION, None))
    raw = bytearray(path.read_bytes())
    study_time = raw.index(b"\x08\x00\x30\x00TM")
    value_end = raw.index(SWALLOWED_ACCESSION.encode()) + len(SWALLOWED_ACCESSION)
    assert value_end > study_time and len(SWALLOWED_ACCESSION) % 2 == 0
    raw[study_time + 6:study_time + 8] = struct.pack("<H", value_end - (study_time + 8))
    path.write_bytes(bytes(raw))
    return path


def _one_pixel_dx(directory: Path) -> Path:
    """A DX chest PA image of 1×1 pixels, otherwise inside every applicability rule."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = NAME, PATIENT_ID, ACCESSION
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.array([[2048]], dtype="<u2").tobytes()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "one-pixel.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _start(config: Path, out: Path, err: Path) -> tuple[subprocess.Popen[bytes], int, int, int]:
    """``pneumo serve`` with stdout and stderr both captured to files (nothing discarded)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"],
        stdout=out.open("wb"), stderr=err.open("wb"),
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for line in out.read_text(errors="replace").splitlines():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "ready":
                return proc, int(message["dicom_port"]), int(message["http_port"]), int(message["hl7_port"])
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"pneumo serve did not become ready: {err.read_text(errors='replace')[-2000:]}")


def _uid(path: Path, keyword: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True)[keyword].value)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("phi")
    ehr_port = free_port()
    extra = "\n".join([
        "threads = 1", "poll_interval = 0.1",
        "[inference]", f'model_dir = "{write_model_dir(tmp / "model")}"',
        "[results]", "study_stable_seconds = 0.5",
        "[log]", 'level = "DEBUG"', 'format = "json"',
        "[fhir.auth]", 'mode = "anonymous"',
        "[[hl7.peers]]", 'sending_application = "RIS"', 'sending_facility = "HOSP"', 'host = "127.0.0.1"',
        "[[hl7.destinations]]", 'name = "ehr"', 'host = "127.0.0.1"', f"port = {ehr_port}",
        'receiving_application = "EHR"', 'receiving_facility = "HOSP"',
    ])
    config = write_config(tmp / "pneumo.toml", tmp / "var", workers=True, extra=extra)
    bad_birth_date = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp / "in", mutate=_with_phi(ACCESSION, BAD_BIRTH_DATE))
    swallowed = _swallowing_accession(tmp / "in")
    tiny = _one_pixel_dx(tmp / "in")
    # The crafted file really lost its accession, and DCMTK reads it (so the attack is sendable).
    assert "AccessionNumber" not in pydicom.dcmread(swallowed, stop_before_pixels=True)

    out, err = tmp / "serve.out", tmp / "serve.err"
    proc, port, http_port, hl7_port = _start(config, out, err)
    ehr = Ehr(ehr_port)
    inspect_errors: list[str] = []

    def studies() -> dict[str, dict[str, object]]:
        listed = pneumo(config, "studies", "--json")
        inspect_errors.append(listed.stderr)
        assert listed.returncode == 0, listed.stderr
        return {str(row["study_instance_uid"]): row for row in map(json.loads, listed.stdout.splitlines())}

    def listed_instances() -> list[dict[str, object]]:
        listed = pneumo(config, "instances", "--json")
        inspect_errors.append(listed.stderr)
        assert listed.returncode == 0, listed.stderr
        return [json.loads(line) for line in listed.stdout.splitlines()]

    try:
        acks = [parse_ack(_exchange(hl7_port, message))[0] for message in _orders_with_phi()]
        sent = subprocess.run(
            [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(port),
             str(bad_birth_date), str(swallowed), str(tiny)],
            capture_output=True, check=False,
        )
        assert sent.returncode == 0, sent.stderr.decode(errors="replace")[-2000:]
        # Wait for every infer job to end (done, or dead-lettered: the fault being guarded
        # against), then for the study results of the analysed ones. The tests judge the outcome.
        deadline = time.monotonic() + 180
        instances = listed_instances()
        while len(instances) < 3 or any(
            i["job_state"] not in ("done", "failed") for i in instances if i["origin"] == "received"
        ):
            assert time.monotonic() < deadline, f"infer jobs did not end in time: {instances}"
            time.sleep(0.5)
            instances = listed_instances()
        rows = studies()
        settle = time.monotonic() + 30
        while any(row["status"] == "pending" for row in rows.values()) and time.monotonic() < settle:
            time.sleep(0.5)
            rows = studies()
        instances = listed_instances()
        fhir = _fhir_queries_with_phi(http_port)
        wait_until(lambda: any(ACCESSION in m for m in ehr.messages), what="the ORU^R01 at the EHR", timeout=60)
    finally:
        ehr.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    output = "\n".join([out.read_text(errors="replace"), err.read_text(errors="replace"), *inspect_errors])
    yield Served(
        output=output, studies=rows, instances=instances,
        bad_birth_date_study=_uid(bad_birth_date, "StudyInstanceUID"),
        swallowed_study=_uid(swallowed, "StudyInstanceUID"),
        tiny_study=_uid(tiny, "StudyInstanceUID"), fhir=fhir, hl7_acks=acks, oru=list(ehr.messages),
    )


def _orders_with_phi() -> list[str]:
    """The RIS: the patient's order (name, MRN, birth date, accession of the radiograph), and one
    for the same patient with no accession number (refused with an error ACK) and a malformed
    birth date quoting the name."""
    order = _order(ORM_231, ACCESSION, "PO-PHI-1", "CTLPHI1")
    order = order.replace("PHI4711", PATIENT_ID).replace("EVERYMAN^ADAM^A^^DR", NAME).replace("|19800704|", f"|{BIRTH_DATE}|")
    malformed = _order(ORM_231, "", "PO-PHI-2", "CTLPHI2").replace("|19800704|", f"|{BAD_BIRTH_DATE} {NAME}|")
    return [order, malformed]


def _fhir_queries_with_phi(http_port: int) -> dict[str, int]:
    """An EHR searching the FHIR API by name, MRN and accession (and one malformed query quoting
    PHI): the answers may hold PHI, the server's output may not. Returns each query's total
    (-1 for the malformed one's HTTP 400)."""
    base = f"http://127.0.0.1:{http_port}/fhir"
    queries = {
        "name": f"{base}/Patient?name={NAME.split('^')[0]}",
        "mrn": f"{base}/Patient?identifier={PATIENT_ID}",
        "accession": f"{base}/DiagnosticReport?identifier={ACCESSION}&_include=DiagnosticReport:subject",
        "malformed": f"{base}/Patient?birthdate={BAD_BIRTH_DATE}",
    }
    totals = {}
    for key, url in queries.items():
        response = httpx.get(url, timeout=10)
        totals[key] = response.json().get("total", -1) if response.status_code == 200 else -response.status_code
    return totals


def _srs(served: Served, study: str) -> list[dict[str, object]]:
    return [i for i in served.instances if i["study_instance_uid"] == study and i["sop_class_uid"] == SR_CLASS]


def test_no_phi_anywhere_in_the_output(served: Served) -> None:
    """Rows 12 and 13: not in log lines, warnings, exception details or raw stderr."""
    leaked = [phi for phi in PHI if phi in served.output]
    assert leaked == [], [line for line in served.output.splitlines() if any(p in line for p in leaked)][:5]
    assert "job.failed" not in served.output and "job.dead_lettered" not in served.output
    # Every stderr line of the server is a structured (JSON) log line: nothing bypassed the pipeline.
    lines = [line for line in served.output.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), [x for x in lines if not x.startswith("{")][:5]
    # ... including the library warning that quoted the referring physician's name.
    assert any(json.loads(line).get("logger") == "py.warnings" for line in lines)


def test_bad_birth_date_does_not_stop_the_analysis(served: Served) -> None:
    """Row 12: the image is valid, so it gets an ``ok`` result and an SR (the date written empty)."""
    study = served.studies[served.bad_birth_date_study]
    assert study["status"] == "final" and study["analysed"] == 1, study
    [sr] = _srs(served, served.bad_birth_date_study)
    report = pydicom.dcmread(str(sr["path"]))
    assert report.PatientBirthDate == "" and report.AccessionNumber == ACCESSION


def test_swallowed_accession_is_analysed_without_leaking(served: Served) -> None:
    """Row 13: the malformed length costs the accession and Study Time, not the result."""
    study = served.studies[served.swallowed_study]
    assert study["status"] == "final" and study["analysed"] == 1, study
    [sr] = _srs(served, served.swallowed_study)
    report = pydicom.dcmread(str(sr["path"]))
    assert report.AccessionNumber == "" and report.StudyTime == ""


def test_one_pixel_dx_is_not_applicable(served: Served) -> None:
    """Row 14: a 1×1 image is not classified; the reason names the rule; no SR is sent."""
    study = served.studies[served.tiny_study]
    assert study["status"] == "not-analysed" and study["analysed"] == 0, study
    reasons = " ".join(str(r["reason"]) for r in study["reasons"])  # type: ignore[attr-defined]
    assert "min_image_side" in reasons and "1x1" in reasons, reasons
    assert _srs(served, served.tiny_study) == []


def test_fhir_searches_by_phi_work_and_leave_no_trace(served: Served) -> None:
    """The EHR's searches by name, MRN and accession find the patient and the report; the
    malformed one is a 400; none of the values reaches the output (checked above, same output)."""
    # Two reports carry ACCESSION: the radiograph's and the 1x1 DX's (cancelled: "not looked at" is a report too).
    assert served.fhir == {"name": 1, "mrn": 1, "accession": 2, "malformed": -400}


def test_hl7_order_and_result_carry_phi_to_the_ehr_and_none_to_the_output(served: Served) -> None:
    """The order is accepted, the malformed one refused with an error ACK; the ORU to the EHR holds
    the patient's identity (it is for the EHR), and the output none of it (test above)."""
    assert served.hl7_acks[0] == "AA" and served.hl7_acks[1] in ("AE", "AR")
    oru = next(m for m in served.oru if ACCESSION in m)
    assert PATIENT_ID in oru and "Zyxwvut" in oru
