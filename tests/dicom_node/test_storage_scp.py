"""Storage SCP against a real pynetdicom client over TCP, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    CTImageStorage,
    MRImageStorage,
    Verification,
)
from sqlalchemy import func, select, text

from audit.models import AuditRecord
from audit.store import verify_chain
from storage.models import Instance, Job
from tests.conftest import copy_with_new_uids, sample

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"


def _client(calling: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.maximum_pdu_size = 0
    for sop in (ComputedRadiographyImageStorage, CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop, [EXPLICIT_LE, IMPLICIT_LE])
    ae.add_requested_context(ComputedRadiographyImageStorage, [J2K_LOSSLESS])
    ae.add_requested_context(ComputedRadiographyImageStorage, [J2K])
    ae.add_requested_context(Verification)
    return ae


def send(gateway: Any, *paths: Path, calling: str = "TESTSCU", called: str = "PNEUMO") -> list[int]:
    """C-STORE each file over one association; returns the statuses."""
    assoc = _client(calling).associate("127.0.0.1", gateway.dicom.port, ae_title=called)
    assert assoc.is_established, "association was not accepted"
    statuses = []
    try:
        for path in paths:
            status = assoc.send_c_store(pydicom.dcmread(path))
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def count(gateway: Any, model: Any) -> int:
    with gateway.runtime.database.read_session() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def audit_events(gateway: Any, event_id: str) -> list[dict[str, Any]]:
    with gateway.runtime.database.read_session() as session:
        rows = session.execute(select(AuditRecord).where(AuditRecord.event_id == event_id).order_by(AuditRecord.seq)).scalars()
        return [row.event for row in rows]


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "CT_small.dcm", "MR_small.dcm"])
def test_stores_real_images_in_received_encoding(gateway_factory: Any, tmp_path: Path, name: str) -> None:
    gateway = gateway_factory()
    path = copy_with_new_uids(sample(name), tmp_path / "in")
    original = pydicom.dcmread(path)

    assert send(gateway, path) == [0x0000]

    with gateway.runtime.database.read_session() as session:
        instance = session.execute(select(Instance)).scalar_one()
        job = session.execute(select(Job)).scalar_one()
    assert instance.sop_instance_uid == original.SOPInstanceUID
    assert instance.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    assert job.kind == "infer" and job.state == "pending" and job.instance_pk == instance.id
    stored = pydicom.dcmread(gateway.runtime.store.absolute(instance.path))
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID  # no transcoding
    assert stored.PixelData == original.PixelData
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    transferred = audit_events(gateway, "110104")
    assert len(transferred) == 1 and transferred[0]["outcome"] == 0
    assert transferred[0]["objects"][0]["object_id"] == original.StudyInstanceUID


@pytest.mark.postgres
def test_storage_on_postgresql(postgres_url: str, gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(postgres_url)
    study = generate_uid()
    paths = [copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in", study_uid=study) for _ in range(5)]
    assert send(gateway, *paths) == [0] * 5
    assert count(gateway, Instance) == 5 and count(gateway, Job) == 5
    with gateway.runtime.database.read_session() as session:
        assert verify_chain(session).ok


def test_echo_and_known_peer(gateway_factory: Any) -> None:
    gateway = gateway_factory()
    assoc = _client("ECHOSCU").associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


@pytest.mark.parametrize(
    ("peers", "calling"),
    [
        ([{"ae_title": "TESTSCU", "host": "127.0.0.1"}], "INTRUDER"),
        ([{"ae_title": "TESTSCU", "host": "192.0.2.10"}], "TESTSCU"),  # right title, wrong host
    ],
)
def test_unknown_peer_is_rejected_and_audited(gateway_factory: Any, peers: list[dict[str, str]], calling: str) -> None:
    gateway = gateway_factory(peers=peers)
    assoc = _client(calling).associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.result == 0x01  # rejected-permanent
    assert assoc.acceptor.primitive.diagnostic == 0x03  # calling-AE-title-not-recognised
    alerts = audit_events(gateway, "110113")
    assert len(alerts) == 1
    assert alerts[0]["event_types"][0]["code"] == "110126"
    assert any(p["user_id"] == calling for p in alerts[0]["participants"])


def test_wrong_called_ae_title_is_rejected(gateway_factory: Any) -> None:
    gateway = gateway_factory()
    assoc = _client().associate("127.0.0.1", gateway.dicom.port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected


def test_identical_resend_is_idempotent(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory()
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    assert send(gateway, path, path) == [0, 0]
    assert send(gateway, path) == [0]
    assert count(gateway, Instance) == 1 and count(gateway, Job) == 1


@pytest.mark.parametrize(("policy", "expect_new"), [("keep", False), ("replace", True)])
def test_conflicting_content_follows_policy(gateway_factory: Any, tmp_path: Path, policy: str, expect_new: bool) -> None:
    gateway = gateway_factory(on_conflict=policy)
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid(), "sop_uid": generate_uid()}
    first = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "a", **uids)
    second = copy_with_new_uids(
        sample("CT_small.dcm"), tmp_path / "b", **uids, mutate=lambda ds: setattr(ds, "StudyDescription", "changed")
    )
    assert send(gateway, first) == [0]
    assert send(gateway, second) == [0]
    with gateway.runtime.database.read_session() as session:
        instance = session.execute(select(Instance)).scalar_one()
    stored = pydicom.dcmread(gateway.runtime.store.absolute(instance.path), stop_before_pixels=True)
    assert (stored.get("StudyDescription") == "changed") is expect_new
    assert count(gateway, Instance) == 1
    actions = [event["action"] for event in audit_events(gateway, "110104")]
    assert actions == ["C", "U" if expect_new else "R"]


def _send_file_raw(gateway: Any, path: Path) -> int:
    """Send *path* as encoded, with the request's UIDs taken from its File Meta Information
    (pynetdicom's chunked mode) — the way a faulty modality sends a mismatching pair."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = _client().associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return int(status.Status)


@pytest.mark.parametrize(
    ("meta_field", "value", "expected"),
    [
        ("MediaStorageSOPClassUID", ComputedRadiographyImageStorage, 0xA900),  # request says CR, data is CT
        ("MediaStorageSOPInstanceUID", "1.2.3.4.5.6.7", 0xC222),
    ],
)
def test_dataset_not_matching_request_gets_failure_and_audit(
    gateway_factory: Any, tmp_path: Path, meta_field: str, value: str, expected: int
) -> None:
    gateway = gateway_factory()
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    ds = pydicom.dcmread(path)
    setattr(ds.file_meta, meta_field, value)
    ds.save_as(path, enforce_file_format=False)

    assert _send_file_raw(gateway, path) == expected
    assert count(gateway, Instance) == 0
    failures = [e for e in audit_events(gateway, "110104") if e["outcome"] != 0]
    assert len(failures) == 1 and f"0x{expected:04X}" in failures[0]["outcome_description"]


def test_malformed_uid_is_refused_and_never_becomes_a_path(gateway_factory: Any) -> None:
    gateway = gateway_factory()
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "X"
    with pytest.warns(UserWarning):
        ds.StudyInstanceUID = "../../etc"  # a path traversal attempt disguised as a UID
    assoc = _client().associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC221
    assert count(gateway, Instance) == 0
    assert not any(gateway.runtime.store.root.rglob("*.dcm"))


def test_garbage_dataset_is_refused(gateway_factory: Any, tmp_path: Path) -> None:
    import os
    import struct

    from pydicom.filewriter import write_file_meta_info

    gateway = gateway_factory()
    source = pydicom.dcmread(sample("CT_small.dcm"))
    path = tmp_path / "garbage.dcm"
    with path.open("wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, source.file_meta)
        handle.write(struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 26) + b"1.2.840.10008.5.1.4.1.1.2\0")
        handle.write(os.urandom(4096))
    status = _send_file_raw(gateway, path)
    assert status != 0 and (0xC000 <= status <= 0xCFFF or status == 0xA900)
    assert count(gateway, Instance) == 0
    assert send(gateway, copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")) == [0]


def test_database_failure_returns_out_of_resources_never_success(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory()
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    with gateway.runtime.database.engine.begin() as connection:
        connection.execute(text("ALTER TABLE job RENAME TO job_gone"))
    assert send(gateway, path) == [0xA700]
    with gateway.runtime.database.engine.begin() as connection:
        connection.execute(text("ALTER TABLE job_gone RENAME TO job"))
    assert count(gateway, Instance) == 0
    assert not any(gateway.runtime.store.root.rglob("*.dcm"))
    assert send(gateway, path) == [0]  # and the node still serves


def test_sixteen_concurrent_associations(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory()
    study = generate_uid()
    paths = [copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in", study_uid=study) for _ in range(48)]
    results: list[list[int]] = []
    barrier = threading.Barrier(16)
    lock = threading.Lock()

    def worker(chunk: list[Path]) -> None:
        barrier.wait()
        statuses = send(gateway, *chunk)
        with lock:
            results.append(statuses)

    threads = [threading.Thread(target=worker, args=(paths[i::16],)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(s for r in results for s in r) == [0] * 48
    assert count(gateway, Instance) == 48 and count(gateway, Job) == 48
    with gateway.runtime.database.read_session() as session:
        assert verify_chain(session).ok


# -- issue 14, item 5: one INFO line per association and per stored instance (UIDs only) ----------


def test_one_log_line_per_instance_and_per_association(gateway_factory: Any, tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from tests.conftest import wait_until

    gateway = gateway_factory()
    good = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    bad = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "bad")
    ds = pydicom.dcmread(bad)
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage  # request says CR, data is CT
    ds.save_as(bad, enforce_file_format=False)
    with capture_logs() as logs:
        assert send(gateway, good, good) == [0, 0]
        assert _send_file_raw(gateway, bad) == 0xA900
        associations = wait_until(
            lambda: [e for e in logs if e["event"] == "dicom.association"] if sum(
                e["event"] == "dicom.association" for e in logs) >= 2 else None,
            timeout=10, what="two association lines",
        )
    stores = [e for e in logs if e["event"] == "dicom.store"]
    original = pydicom.dcmread(good, stop_before_pixels=True)
    assert [(e["log_level"], e["outcome"], e["status"]) for e in stores] == [
        ("info", "stored", "0x0000"), ("info", "duplicate", "0x0000"), ("warning", "refused", "0xA900")
    ]
    for entry in stores[:2]:
        assert entry["sop_instance_uid"] == original.SOPInstanceUID
        assert entry["sop_class_uid"] == original.SOPClassUID == CTImageStorage
        assert entry["transfer_syntax_uid"] in (EXPLICIT_LE, IMPLICIT_LE)
        assert entry["size"] > 0
    first, second = associations
    assert first["log_level"] == "info"
    assert (first["calling_ae"], first["called_ae"], first["address"]) == ("TESTSCU", "PNEUMO", "127.0.0.1")
    assert (first["result"], first["end"], first["instances_stored"], first["instances_refused"]) == (
        "accepted", "released", 2, 0
    )
    assert (second["instances_stored"], second["instances_refused"]) == (0, 1)
    text = repr(logs)
    assert str(original.PatientName) not in text and str(original.PatientID) not in text


def test_a_rejected_association_is_one_info_line_too(gateway_factory: Any) -> None:
    from structlog.testing import capture_logs

    from tests.conftest import wait_until

    gateway = gateway_factory()
    with capture_logs() as logs:
        assert _client("INTRUDER").associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO").is_rejected
        line = wait_until(lambda: next((e for e in logs if e["event"] == "dicom.association"), None), timeout=10)
    assert (line["log_level"], line["calling_ae"], line["result"], line["end"]) == ("info", "INTRUDER", "rejected", "rejected")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"accepted": True, "rejected": False, "released": True, "aborted": False}, "released"),
        ({"accepted": True, "rejected": False, "released": False, "aborted": True}, "aborted"),
        ({"accepted": False, "rejected": True, "released": False, "aborted": False}, "rejected"),
        ({"accepted": True, "rejected": False, "released": False, "aborted": False}, "closed"),
        ({"accepted": False, "rejected": False, "released": False, "aborted": False}, "no-request"),
    ],
)
def test_association_end_words(flags: dict[str, bool], expected: str) -> None:
    from dicom_node.listener import association_end

    assert association_end(**flags) == expected
