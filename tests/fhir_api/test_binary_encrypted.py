"""FHIR ``Binary`` (our DICOM objects cited by DiagnosticReport.presentedForm) from an encrypted
file store: the decrypted Part 10 bytes are served; a tampered file is answered with a 500
OperationOutcome, never with its bytes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from storage.db import Database
from storage.encryption import Keyring
from storage.filestore import FileStore, is_encrypted
from storage.index import add_instance
from storage.metadata import extract_metadata
from storage.models import InstanceOrigin
from tests.conftest import copy_with_new_uids, sample
from tests.fhir_api.test_api import Server
from tests.fhir_api.tokens import TokenService


@pytest.fixture
def server(database: Database, tmp_path: Path) -> Iterator[Server]:
    running = Server(database, tmp_path, TokenService(tmp_path / "idp"))
    # The same store directories, now with a key: what gateway/app.py builds from [storage.encryption].
    running.api.files = FileStore(tmp_path / "dicom", tmp_path / "tmp", fsync=False,
                                  keyring=Keyring("fhir-test", {"fhir-test": os.urandom(32)}))
    yield running
    running.close()


def test_binary_is_decrypted_and_a_tampered_file_is_never_served(server: Server, tmp_path: Path) -> None:
    source = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    plain = source.read_bytes()
    meta = extract_metadata(pydicom.dcmread(source, stop_before_pixels=True))
    store = server.api.files
    stored = store.commit(store.stage_bytes(plain), store.relative_path(
        meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid))
    with server.db.session() as session:
        add_instance(session, meta, transfer_syntax_uid="1.2.840.10008.1.2.1", relative_path=stored.relative_path,
                     size=stored.size, sha256=stored.sha256, origin=InstanceOrigin.GENERATED, calling_ae=None)
    path = store.absolute(stored.relative_path)
    assert is_encrypted(path) and plain not in path.read_bytes()

    response = server.get(f"/Binary/{meta.sop_instance_uid}", headers={"Accept": "application/dicom"})
    assert response.status_code == 200 and response.content == plain

    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    refused = server.get(f"/Binary/{meta.sop_instance_uid}", headers={"Accept": "application/dicom"})
    assert refused.status_code == 500 and refused.json()["resourceType"] == "OperationOutcome"
    assert plain[132:1000] not in refused.content
