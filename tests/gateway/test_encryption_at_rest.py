"""Encryption at rest end to end: a gateway with a key receives a real radiograph from DCMTK
``storescu``; the file on disk holds no plaintext (no ``DICM``, no patient name); the worker
classifies it from the encrypted file, writes its SR encrypted, and delivers the SR to a DCMTK
``storescp``; ``getscu`` retrieves the image byte-identical in its pixels. A tampered file is
never served: its C-GET sub-operation fails."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from gateway.app import Workers, build_engine
from storage.filestore import is_encrypted
from storage.keyring import generate_key_file
from storage.models import InferenceResult, Instance, Job, JobState
from tests.conftest import copy_with_new_uids, sample
from tests.dicom_node.test_query_retrieve import _dcmtk, storescp
from tests.gateway.test_workflow import wait_for_jobs
from tests.inference.tiny_model import write_model_dir

PEERS = [
    {"ae_title": "STORESCU", "host": "127.0.0.1", "permissions": ["echo", "store"]},
    {"ae_title": "GETSCU", "host": "127.0.0.1", "permissions": ["get"]},
]


def _getscu(gateway: Any, study_uid: str, out: Path) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [_dcmtk("getscu"), "-S", "-aet", "GETSCU", "-aec", "PNEUMO", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
         "127.0.0.1", str(gateway.dicom.port)],
        check=False, capture_output=True, text=True, timeout=120,
    )


def test_encrypted_store_ingests_classifies_delivers_and_retrieves(gateway_factory: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "store.key"
    generate_key_file(key_file)
    received = tmp_path / "pacs"
    with storescp(received) as pacs_port:
        gateway = gateway_factory(
            sections={
                "storage": {"encryption": {"key_id": "site-2026", "key_file": str(key_file)}},
                "inference": {"model_dir": str(write_model_dir(tmp_path / "model"))},
                "worker": {"poll_interval": 0.1},
            },
            peers=PEERS,
            destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": pacs_port}],
        )
        source_path = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in")
        source = pydicom.dcmread(source_path)
        sent = subprocess.run(
            [_dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(gateway.dicom.port),
             str(source_path)],
            check=False, capture_output=True, text=True, timeout=120,
        )
        assert sent.returncode == 0, sent.stderr

        store = gateway.runtime.store
        with gateway.runtime.database.read_session() as session:
            row = session.execute(select(Instance).where(Instance.sop_instance_uid == source.SOPInstanceUID)).scalar_one()
        on_disk = store.absolute(row.path).read_bytes()
        assert is_encrypted(store.absolute(row.path)) and store.key_id(row.path) == "site-2026"
        assert b"DICM" not in on_disk and str(source.PatientName).encode() not in on_disk
        assert source.PixelData[:4096] not in on_disk
        plain = store.read_bytes(row.path)
        assert plain[128:132] == b"DICM"
        assert (row.size, row.sha256) == (len(plain), hashlib.sha256(plain).hexdigest())  # the plaintext's identity

        [job] = wait_for_jobs(gateway, "infer", 1)
        assert job.state == JobState.DONE, job.last_error
        with gateway.runtime.database.read_session() as session:
            result = session.execute(select(InferenceResult)).scalar_one()
            sr_row = session.get(Instance, result.sr_instance_pk)
            assert sr_row is not None
            sr_path = sr_row.path
        assert result.status == "ok" and 0.0 <= (result.probability or -1) <= 1.0
        assert is_encrypted(store.absolute(sr_path))  # what we generate is encrypted too

        deliveries = wait_for_jobs(gateway, "deliver", 2)
        assert deliveries and all(d.state == JobState.DONE for d in deliveries), [d.last_error for d in deliveries]
        arrived = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in received.iterdir() if p.is_file()}
        with gateway.runtime.database.read_session() as session:
            sr_uid = session.get(Instance, result.sr_instance_pk).sop_instance_uid
        assert sr_uid in arrived  # decrypted and sent as DICOM

    got = _getscu(gateway, str(source.StudyInstanceUID), tmp_path / "get")
    assert got.returncode == 0, got.stderr
    retrieved = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in (tmp_path / "get").iterdir())}
    image = retrieved[str(source.SOPInstanceUID)]
    assert image.PixelData == source.PixelData and image.PatientName == source.PatientName

    # Tamper one byte in the middle of the stored image: it is never served again.
    raw = bytearray(on_disk)
    raw[len(raw) // 2] ^= 0x01
    store.absolute(row.path).write_bytes(bytes(raw))
    again = _getscu(gateway, str(source.StudyInstanceUID), tmp_path / "get-tampered")
    names = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
             for p in (tmp_path / "get-tampered").iterdir()}
    assert str(source.SOPInstanceUID) not in names  # the tampered image did not leave
    assert sr_uid in names  # the intact objects of the study still did
    assert "Failed" in again.stdout + again.stderr or again.returncode != 0


def test_tampered_image_is_dead_lettered_not_classified(gateway_factory: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "store.key"
    generate_key_file(key_file)
    gateway = gateway_factory(
        sections={"storage": {"encryption": {"key_id": "k", "key_file": str(key_file)}},
                  "inference": {"model_dir": str(write_model_dir(tmp_path / "model"))},
                  "worker": {"enabled": False}},
        peers=PEERS,
    )
    source_path = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / "in")
    sent = subprocess.run(
        [_dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(gateway.dicom.port), str(source_path)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert sent.returncode == 0, sent.stderr
    store = gateway.runtime.store
    with gateway.runtime.database.read_session() as session:
        [row] = session.execute(select(Instance)).scalars().all()
    path = store.absolute(row.path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x80  # inside the last chunk's tag
    path.write_bytes(bytes(raw))
    workers = Workers(gateway.runtime, build_engine(gateway.runtime.settings))  # started only now
    workers.start()
    try:
        [job] = wait_for_jobs(gateway, "infer", 1)
    finally:
        workers.stop()
    assert job.state == JobState.FAILED and "authenticated decryption" in (job.last_error or "")
    with gateway.runtime.database.read_session() as session:
        assert session.execute(select(InferenceResult)).scalars().all() == []
        assert session.execute(select(Job).where(Job.kind == "deliver")).scalars().all() == []
