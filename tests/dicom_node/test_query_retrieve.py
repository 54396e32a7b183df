"""Study Root Query/Retrieve SCP against real DCMTK tools (findscu, movescu, getscu, storescp)
and a pynetdicom client, over received images and a generated object, with the audit trail."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from audit.store import verify_chain
from storage.index import add_instance
from storage.metadata import extract_metadata
from storage.models import InstanceOrigin
from tests.conftest import copy_with_new_uids, dcmtk, sample
from tests.dicom_node.test_storage_scp import audit_events, send

#: These tests exercise the services themselves, so every peer is granted all of them
#: (per-peer permissions: tests/dicom_node/test_permissions.py).
ALL_SERVICES = ["echo", "store", "find", "move", "get"]
QR_PEERS = [
    {"ae_title": "TESTSCU", "host": "127.0.0.1", "permissions": ALL_SERVICES},
    {"ae_title": "FINDSCU", "host": "127.0.0.1", "permissions": ALL_SERVICES},
    {"ae_title": "MOVESCU", "host": "127.0.0.1", "permissions": ALL_SERVICES},
    {"ae_title": "GETSCU", "host": "127.0.0.1", "permissions": ALL_SERVICES},
]
DEADLINE_S = 30.0


# -- helpers ------------------------------------------------------------------------------------


def _dcmtk(tool: str) -> str:
    """The DCMTK binary, not pynetdicom's same-named app that an activated venv puts first."""
    path = dcmtk(tool)
    for candidate in (path, f"/usr/bin/{tool}", f"/usr/local/bin/{tool}"):
        if Path(candidate).is_file():
            version = subprocess.run([candidate, "--version"], check=False, capture_output=True, text=True, timeout=10)
            if "dcmtk" in version.stdout.lower():
                return candidate
    pytest.skip(f"DCMTK {tool} not found (only a non-DCMTK {tool} on PATH)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def storescp(directory: Path, *options: str) -> Iterator[int]:
    """A DCMTK storescp on a free port, with extra transfer syntax *options*, ready (answers
    C-ECHO) when the block starts."""
    port = _free_port()
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [_dcmtk("storescp"), *options, "-aet", "DEST", "-od", str(directory), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        deadline = time.monotonic() + DEADLINE_S
        while True:
            assert process.poll() is None, "storescp exited early"
            assoc = ae.associate("127.0.0.1", port, ae_title="DEST")
            if assoc.is_established:
                assoc.release()
                break
            assert time.monotonic() < deadline, "storescp did not come up"
            time.sleep(0.05)  # poll interval, bounded by the deadline above
        yield port
    finally:
        process.terminate()
        process.wait(10)


def _store_generated(gateway: Any, source: Path, study_uid: str) -> str:
    """Place a generated object (a Secondary Capture) in the store the way our workflow does:
    file committed, then indexed with origin 'generated'."""
    path = copy_with_new_uids(
        source, source.parent / "generated", study_uid=study_uid,
        mutate=lambda ds: (
            setattr(ds, "SOPClassUID", SecondaryCaptureImageStorage),
            setattr(ds.file_meta, "MediaStorageSOPClassUID", SecondaryCaptureImageStorage),
            setattr(ds, "Modality", "OT"),
        ),
    )
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta = extract_metadata(ds)
    store = gateway.runtime.store
    stored = store.commit(store.stage_bytes(path.read_bytes()), store.relative_path(
        meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid))
    with gateway.runtime.database.session() as session:
        add_instance(
            session, meta, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), relative_path=stored.relative_path,
            size=stored.size, sha256=stored.sha256, origin=InstanceOrigin.GENERATED, calling_ae=None,
        )
    return meta.sop_instance_uid


@pytest.fixture
def loaded(gateway_factory: Any, tmp_path: Path) -> dict[str, Any]:
    """A gateway holding two studies: CT x2 (+ one generated SC) and MR x1."""
    return _load(gateway_factory(peers=QR_PEERS), tmp_path)


def _load(gateway: Any, tmp_path: Path, extra_peers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    ct_study, mr_study = generate_uid(), generate_uid()
    ct_series = generate_uid()
    ct = [
        copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in", study_uid=ct_study, series_uid=ct_series,
                           mutate=lambda ds: setattr(ds, "StudyDate", "20040119"))
        for _ in range(2)
    ]
    mr = copy_with_new_uids(sample("MR_small.dcm"), tmp_path / "in", study_uid=mr_study,
                            mutate=lambda ds: setattr(ds, "StudyDate", "20061231"))
    assert send(gateway, *ct, mr) == [0, 0, 0]
    generated = _store_generated(gateway, ct[0], ct_study)
    return {
        "gateway": gateway, "ct_study": ct_study, "mr_study": mr_study, "ct_series": ct_series,
        "ct": [pydicom.dcmread(p).SOPInstanceUID for p in ct], "mr": pydicom.dcmread(mr).SOPInstanceUID,
        "generated": generated,
    }


def _findscu(gateway: Any, out: Path, level: str, *keys: str, model: str = "-S") -> list[Dataset]:
    """DCMTK findscu; *model* ``-S`` Study Root, ``-P`` Patient Root."""
    out.mkdir(parents=True, exist_ok=True)
    command = [_dcmtk("findscu"), model, "-aet", "FINDSCU", "-aec", "PNEUMO", "-X", "-od", str(out),
               "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        command += ["-k", key]
    command += ["127.0.0.1", str(gateway.dicom.port)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def _movescu(gateway: Any, level: str, *keys: str, model: str = "-S") -> subprocess.CompletedProcess[str]:
    """DCMTK movescu of *level* with *keys* to the peer DEST; *model* ``-S`` Study Root, ``-P`` Patient Root."""
    command = [_dcmtk("movescu"), model, "-aet", "MOVESCU", "-aec", "PNEUMO", "-aem", "DEST",
               "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        command += ["-k", key]
    command += ["127.0.0.1", str(gateway.dicom.port)]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)


def _client(calling: str) -> AE:
    ae = AE(ae_title=calling)
    for sop in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
                StudyRootQueryRetrieveInformationModelGet):
        ae.add_requested_context(sop)
    return ae


def _as_list(value: Any) -> list[str]:
    """A multi-valued element's values (pydicom gives a str when there is only one)."""
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def _identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


# -- C-FIND -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "keys", "expected"),
    [
        ("STUDY", ["PatientName=CompressedSamples*"], {"ct_study", "mr_study"}),  # wildcard (CT and MR samples)
        ("STUDY", ["PatientName=compressedsamples^ct*"], {"ct_study"}),  # PN: case-insensitive
        ("STUDY", ["StudyDate=20050101-"], {"mr_study"}),  # date range
        ("STUDY", ["StudyDate=-20041231"], {"ct_study"}),
        ("STUDY", ["StudyInstanceUID={ct_study}\\{mr_study}"], {"ct_study", "mr_study"}),  # UID list
        ("STUDY", ["ModalitiesInStudy=OT"], {"ct_study"}),  # our generated object counts
    ],
)
def test_findscu_study_level(loaded: dict[str, Any], tmp_path: Path, level: str, keys: list[str], expected: set[str]) -> None:
    responses = _findscu(
        loaded["gateway"], tmp_path / "rsp", level, "StudyInstanceUID", "PatientName", "NumberOfStudyRelatedInstances",
        *(key.format(**loaded) for key in keys),
    )
    assert {str(r.StudyInstanceUID) for r in responses} == {loaded[name] for name in expected}
    for response in responses:
        assert response.RetrieveAETitle == "PNEUMO"
        count = 3 if response.StudyInstanceUID == loaded["ct_study"] else 1
        assert int(response.NumberOfStudyRelatedInstances) == count


def test_findscu_series_and_image_levels(loaded: dict[str, Any], tmp_path: Path) -> None:
    gateway = loaded["gateway"]
    series = _findscu(gateway, tmp_path / "series", "SERIES", f"StudyInstanceUID={loaded['ct_study']}",
                      "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances")
    assert sorted(str(r.Modality) for r in series) == ["CT", "OT"]
    ct_series = next(r for r in series if r.Modality == "CT")
    assert ct_series.SeriesInstanceUID == loaded["ct_series"] and int(ct_series.NumberOfSeriesRelatedInstances) == 2

    images = _findscu(gateway, tmp_path / "images", "IMAGE", f"StudyInstanceUID={loaded['ct_study']}",
                      f"SeriesInstanceUID={loaded['ct_series']}", "SOPInstanceUID", "SOPClassUID")
    assert sorted(str(r.SOPInstanceUID) for r in images) == sorted(loaded["ct"])
    assert {str(r.SOPClassUID) for r in images} == {CTImageStorage}

    queries = audit_events(gateway, "110112")
    assert len(queries) == 2
    for event in queries:
        assert event["outcome"] == 0 and event["action"] == "E"
        assert any(p["user_id"] == "FINDSCU" and p["user_is_requestor"] for p in event["participants"])
        [sop] = event["objects"]
        assert sop["object_id"] == StudyRootQueryRetrieveInformationModelFind
        assert sop["id_type"]["code"] == "110181" and sop["details"]["TransferSyntax"]
    # the audit keeps the identifier exactly as sent: decode it with the recorded syntax
    last = queries[-1]["objects"][0]
    raw = base64.b64decode(last["query"])
    syntax = last["details"]["TransferSyntax"]
    from pynetdicom.dsutils import decode

    identifier = decode(io.BytesIO(raw), syntax == ImplicitVRLittleEndian, True)
    assert identifier.QueryRetrieveLevel == "IMAGE" and identifier.SeriesInstanceUID == loaded["ct_series"]


def test_pynetdicom_find_and_bad_identifier(
    loaded: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(_config, "LOG_RESPONSE_IDENTIFIERS", False)  # the test client's own logging
    gateway = loaded["gateway"]
    assoc = _client("TESTSCU").associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        results = list(assoc.send_c_find(
            _identifier("STUDY", StudyInstanceUID="", PatientName="CompressedSamples*", ModalitiesInStudy=""),
            StudyRootQueryRetrieveInformationModelFind,
        ))
        bad = list(assoc.send_c_find(_identifier("PATIENT", PatientID=""), StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    pending = [identifier for status, identifier in results if status.Status == 0xFF00]
    assert results[-1][0].Status == 0x0000
    modalities = {str(r.StudyInstanceUID): sorted(_as_list(r.ModalitiesInStudy)) for r in pending}
    assert modalities == {loaded["ct_study"]: ["CT", "OT"], loaded["mr_study"]: ["MR"]}
    assert [status.Status for status, _ in bad] == [0xA900]
    outcomes = sorted(event["outcome"] for event in audit_events(gateway, "110112"))
    assert outcomes == [0, 4]  # the refused query is audited too
    logged = caplog.text + capsys.readouterr().out
    assert "CompressedSamples" not in logged and "dicom.find" in logged  # no PHI in log lines


# -- C-MOVE -------------------------------------------------------------------------------------


def test_movescu_to_storescp(gateway_factory: Any, tmp_path: Path) -> None:
    received = tmp_path / "dest"
    with storescp(received) as port:
        gateway = gateway_factory(peers=[*QR_PEERS, {"ae_title": "DEST", "host": "127.0.0.1", "port": port}])
        data = _load(gateway, tmp_path)
        result = _movescu(gateway, "STUDY", f"StudyInstanceUID={data['ct_study']}")
        # A retrieve must name the unique key of its level: no "move everything of patient X".
        assoc = _client("MOVESCU").associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")
        assert assoc.is_established
        try:
            refused = [status.Status for status, _ in assoc.send_c_move(
                _identifier("STUDY", PatientID="*"), "DEST", StudyRootQueryRetrieveInformationModelMove
            )]
        finally:
            assoc.release()
    assert result.returncode == 0, result.stderr
    assert refused[-1] == 0xA900
    arrived = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received.iterdir()}
    assert arrived == {*data["ct"], data["generated"]}  # received images and our own object

    [begin] = audit_events(gateway, "110102")
    assert begin["objects"][0]["object_id"] == data["ct_study"]
    assert sorted(begin["objects"][0]["instances"]) == sorted(arrived)
    moved = [e for e in audit_events(gateway, "110104") if e["action"] == "R"]
    assert len(moved) == 1 and moved[0]["outcome"] == 0
    participants = {p["user_id"]: p for p in moved[0]["participants"]}
    assert participants["DEST"]["role_id"]["code"] == "110152" and not participants["DEST"]["user_is_requestor"]
    assert participants["PNEUMO"]["role_id"]["code"] == "110153"
    assert participants["MOVESCU"]["user_is_requestor"]
    with gateway.runtime.database.read_session() as session:
        assert verify_chain(session).ok


def test_unknown_move_destination_is_refused(loaded: dict[str, Any]) -> None:
    gateway = loaded["gateway"]
    assoc = _client("TESTSCU").associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        # TESTSCU is a configured peer but has no port: not a destination either.
        for destination in ("NOWHERE", "TESTSCU"):
            statuses = [status.Status for status, _ in assoc.send_c_move(
                _identifier("STUDY", StudyInstanceUID=loaded["ct_study"]), destination,
                StudyRootQueryRetrieveInformationModelMove,
            )]
            assert statuses == [0xA801]
    finally:
        assoc.release()
    assert audit_events(gateway, "110102") == []


def test_unreachable_move_destination_is_refused_and_audited(gateway_factory: Any, tmp_path: Path) -> None:
    dead_port = _free_port()  # configured, but nothing listens there
    gateway = gateway_factory(peers=[*QR_PEERS, {"ae_title": "DEAD", "host": "127.0.0.1", "port": dead_port}])
    data = _load(gateway, tmp_path)
    assoc = _client("MOVESCU").associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        statuses = [status.Status for status, _ in assoc.send_c_move(
            _identifier("STUDY", StudyInstanceUID=data["mr_study"]), "DEAD", StudyRootQueryRetrieveInformationModelMove,
        )]
    finally:
        assoc.release()
    assert statuses == [0xA801]
    assert len(audit_events(gateway, "110102")) == 1
    [ended] = [e for e in audit_events(gateway, "110104") if e["action"] == "R"]
    assert ended["outcome"] == 8 and ended["objects"][0]["instances"] == []  # nothing was sent


# -- C-GET --------------------------------------------------------------------------------------


def test_getscu_receives_files(loaded: dict[str, Any], tmp_path: Path) -> None:
    gateway = loaded["gateway"]
    out = tmp_path / "get"
    out.mkdir()
    result = subprocess.run(
        [_dcmtk("getscu"), "-S", "-aet", "GETSCU", "-aec", "PNEUMO", "-od", str(out),
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={loaded['ct_study']}",
         "-k", f"SeriesInstanceUID={loaded['ct_series']}", "127.0.0.1", str(gateway.dicom.port)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    files = [p for p in out.iterdir() if p.is_file()]
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files} == set(loaded["ct"])
    [transferred] = [e for e in audit_events(gateway, "110104") if e["action"] == "R"]
    assert transferred["outcome"] == 0 and sorted(transferred["objects"][0]["instances"]) == sorted(loaded["ct"])
    getter = next(p for p in transferred["participants"] if p["user_id"] == "GETSCU")
    assert getter["user_is_requestor"] and getter["role_id"]["code"] == "110152"


def _get(gateway: Any, identifier: Dataset) -> tuple[list[int], list[Dataset]]:
    """C-GET with a pynetdicom client acting as Storage SCP on its own association."""
    ae = _client("TESTSCU")
    for sop in (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    roles = [build_role(sop, scp_role=True) for sop in (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage)]
    received: list[Dataset] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset)
        return 0x0000

    assoc = ae.associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        statuses = [status.Status for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    return statuses, received


def test_pynetdicom_get_study_with_generated_object(loaded: dict[str, Any]) -> None:
    statuses, received = _get(loaded["gateway"], _identifier("STUDY", StudyInstanceUID=loaded["ct_study"]))
    assert statuses[-1] == 0x0000 and set(statuses[:-1]) == {0xFF00}
    assert {str(ds.SOPInstanceUID) for ds in received} == {*loaded["ct"], loaded["generated"]}
    sc = next(ds for ds in received if ds.SOPInstanceUID == loaded["generated"])
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.PixelData  # whole object, pixels included


def test_get_without_unique_key_is_refused(loaded: dict[str, Any]) -> None:
    statuses, received = _get(loaded["gateway"], _identifier("STUDY", PatientID="*"))
    assert statuses == [0xA900] and received == []


@pytest.mark.postgres
def test_find_and_get_on_postgresql(postgres_url: str, gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(postgres_url, peers=QR_PEERS)
    data = _load(gateway, tmp_path)
    responses = _findscu(gateway, tmp_path / "rsp", "STUDY", "StudyInstanceUID", "PatientName=*ct1",
                         "ModalitiesInStudy")
    assert [str(r.StudyInstanceUID) for r in responses] == [data["ct_study"]]
    statuses, received = _get(gateway, _identifier("IMAGE", StudyInstanceUID=data["mr_study"], SOPInstanceUID=data["mr"]))
    assert statuses[-1] == 0x0000 and [str(ds.SOPInstanceUID) for ds in received] == [data["mr"]]
    assert len(audit_events(gateway, "110112")) == 1 and len(audit_events(gateway, "110102")) == 1
    with gateway.runtime.database.read_session() as session:
        assert verify_chain(session).ok



# -- transcoding for a peer that does not take the stored transfer syntax -----------------------




def _compressed_study(gateway: Any, tmp_path: Path) -> dict[str, Any]:
    """A JPEG 2000 lossless and a JPEG 2000 (lossy) CR image in one study. Decoding either is
    deterministic, so what arrives decompressed must equal the stored image's own decode."""
    study = generate_uid()
    paths = [copy_with_new_uids(sample(name), tmp_path / "in", study_uid=study)
             for name in ("RG1_J2KR.dcm", "RG1_J2KI.dcm")]
    assert send(gateway, *paths) == [0, 0]
    originals = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in paths)}
    return {"study": study, "originals": originals}


def _assert_same_pixels(received: Dataset, original: Dataset) -> None:
    import numpy as np

    assert received.SOPInstanceUID == original.SOPInstanceUID  # the same instance, another encoding
    assert np.array_equal(received.pixel_array, original.pixel_array)  # lossless: bit for bit


def test_move_to_uncompressed_only_storescp_decompresses(gateway_factory: Any, tmp_path: Path) -> None:
    received = tmp_path / "dest"
    with storescp(received) as port:  # storescp's default: uncompressed transfer syntaxes only
        gateway = gateway_factory(peers=[*QR_PEERS, {"ae_title": "DEST", "host": "127.0.0.1", "port": port}])
        data = _compressed_study(gateway, tmp_path)
        result = _movescu(gateway, "STUDY", f"StudyInstanceUID={data['study']}")
    assert result.returncode == 0, result.stderr
    files = [pydicom.dcmread(p) for p in received.iterdir()]
    assert {str(ds.SOPInstanceUID) for ds in files} == set(data["originals"])
    for ds in files:
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        _assert_same_pixels(ds, data["originals"][str(ds.SOPInstanceUID)])
    [moved] = [e for e in audit_events(gateway, "110104") if e["action"] == "R"]
    assert moved["outcome"] == 0 and sorted(moved["objects"][0]["instances"]) == sorted(data["originals"])


def test_move_to_storescp_accepting_the_stored_syntax_sends_it_unchanged(gateway_factory: Any, tmp_path: Path) -> None:
    received = tmp_path / "dest"
    with storescp(received, "+xa") as port:  # accept every transfer syntax
        gateway = gateway_factory(peers=[*QR_PEERS, {"ae_title": "DEST", "host": "127.0.0.1", "port": port}])
        data = _compressed_study(gateway, tmp_path)
        result = _movescu(gateway, "STUDY", f"StudyInstanceUID={data['study']}")
    assert result.returncode == 0, result.stderr
    files = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in received.iterdir())}
    assert set(files) == set(data["originals"])
    for uid, ds in files.items():
        original = data["originals"][uid]
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert ds.PixelData == original.PixelData  # the stored bytes, not re-encoded


def test_get_with_uncompressed_only_contexts_decompresses(gateway_factory: Any, tmp_path: Path) -> None:
    gateway = gateway_factory(peers=QR_PEERS)
    data = _compressed_study(gateway, tmp_path)
    ae = _client("TESTSCU")
    storage = (ComputedRadiographyImageStorage,)
    for sop in storage:
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    got: list[Dataset] = []

    def on_store(event: Any) -> int:
        got.append(event.dataset)
        return 0x0000

    assoc = ae.associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO",
                         ext_neg=[build_role(sop, scp_role=True) for sop in storage],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        statuses = [status.Status for status, _ in assoc.send_c_get(
            _identifier("STUDY", StudyInstanceUID=data["study"]), StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000 and set(statuses[:-1]) == {0xFF00}
    assert {str(ds.SOPInstanceUID) for ds in got} == set(data["originals"])
    for ds in got:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if ds.is_implicit_VR else ExplicitVRLittleEndian
        _assert_same_pixels(ds, data["originals"][str(ds.SOPInstanceUID)])


# -- Patient Root (PS3.4 C.6.1) -----------------------------------------------------------------


def _findscu_patient_root(gateway: Any, out: Path, level: str, *keys: str) -> list[Dataset]:
    """DCMTK findscu with the Patient Root model (-P)."""
    return _findscu(gateway, out, level, *keys, model="-P")


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["PatientName=CompressedSamples*"], {"1CT1", "4MR1"}),  # wildcard
        (["PatientName=compressedsamples^mr?"], {"4MR1"}),  # PN: case-insensitive, "?" is one character
        (["PatientID=1CT1"], {"1CT1"}),  # single value matching on the unique key
        (["PatientID=1CT"], set()),  # ... exact, not a prefix
        (["PatientID=1CT1", "IssuerOfPatientID=ELSEWHERE"], set()),  # the issuer narrows it
        (["PatientSex=F"], {"4MR1"}),
        (["StudyDate=19000101"], {"1CT1", "4MR1"}),  # a lower level's key is not matched at PATIENT level
    ],
)
def test_findscu_patient_root_patient_level(
    loaded: dict[str, Any], tmp_path: Path, keys: list[str], expected: set[str]
) -> None:
    responses = _findscu_patient_root(
        loaded["gateway"], tmp_path / "rsp", "PATIENT", "PatientName", "PatientID", "StudyDate",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
        *keys,
    )
    assert {str(r.PatientID) for r in responses} == expected
    counts = {"1CT1": (1, 2, 3), "4MR1": (1, 1, 1)}  # CT: 2 images + our generated object in its own series
    for response in responses:
        assert response.QueryRetrieveLevel == "PATIENT" and response.RetrieveAETitle == "PNEUMO"
        assert str(response.PatientName).startswith("CompressedSamples^")
        assert response.StudyDate in ("", None)  # asked for, belongs to a lower level: returned empty
        assert (int(response.NumberOfPatientRelatedStudies), int(response.NumberOfPatientRelatedSeries),
                int(response.NumberOfPatientRelatedInstances)) == counts[str(response.PatientID)]


def test_findscu_patient_root_lower_levels(loaded: dict[str, Any], tmp_path: Path) -> None:
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    gateway = loaded["gateway"]
    studies = _findscu_patient_root(gateway, tmp_path / "studies", "STUDY", "PatientID=4MR1", "StudyInstanceUID")
    assert [str(r.StudyInstanceUID) for r in studies] == [loaded["mr_study"]]
    images = _findscu_patient_root(gateway, tmp_path / "images", "IMAGE", "PatientID=1CT1",
                                   f"StudyInstanceUID={loaded['ct_study']}", f"SeriesInstanceUID={loaded['ct_series']}",
                                   "SOPInstanceUID")
    assert sorted(str(r.SOPInstanceUID) for r in images) == sorted(loaded["ct"])
    queries = audit_events(gateway, "110112")
    assert len(queries) == 2
    assert {q["objects"][0]["object_id"] for q in queries} == {PatientRootQueryRetrieveInformationModelFind}


def test_patient_root_move_and_get_at_patient_level(
    gateway_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    received = tmp_path / "dest"
    with storescp(received) as port:
        gateway = gateway_factory(peers=[*QR_PEERS, {"ae_title": "DEST", "host": "127.0.0.1", "port": port}])
        data = _load(gateway, tmp_path)
        moved = _movescu(gateway, "PATIENT", "PatientID=1CT1", model="-P")
        # A PATIENT level retrieve needs one PatientID: no "everyone whose ID matches *"; and
        # the Study Root model has no PATIENT level at all.
        ae = AE(ae_title="MOVESCU")
        ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")
        assert assoc.is_established
        try:
            refused = [
                [status.Status for status, _ in assoc.send_c_move(_identifier("PATIENT", PatientID=value), "DEST", model)]
                for value, model in (("*", PatientRootQueryRetrieveInformationModelMove),
                                     ("", PatientRootQueryRetrieveInformationModelMove),
                                     ("1CT1", StudyRootQueryRetrieveInformationModelMove))
            ]
        finally:
            assoc.release()
    assert moved.returncode == 0, moved.stderr
    arrived = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received.iterdir()}
    assert arrived == {*data["ct"], data["generated"]}  # every instance of patient 1CT1, none of 4MR1
    assert refused == [[0xA900], [0xA900], [0xA900]]

    out = tmp_path / "get"
    out.mkdir()
    got = subprocess.run(
        [_dcmtk("getscu"), "-P", "-aet", "GETSCU", "-aec", "PNEUMO", "-od", str(out),
         "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=4MR1", "127.0.0.1", str(gateway.dicom.port)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert got.returncode == 0, got.stderr
    files = [p for p in out.iterdir() if p.is_file()]
    assert [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files] == [data["mr"]]
    transferred = [e for e in audit_events(gateway, "110104") if e["action"] == "R"]
    assert [e["outcome"] for e in transferred] == [0, 0]
    logged = caplog.text + capsys.readouterr().out
    assert "CompressedSamples" not in logged and "1CT1" not in logged and "4MR1" not in logged  # no PHI in logs
    with gateway.runtime.database.read_session() as session:
        assert verify_chain(session).ok


def test_patient_root_needs_the_same_grants_as_study_root(gateway_factory: Any) -> None:
    """A peer granted only echo and store (a PACS pushing images) is offered no Patient Root
    context: patient-level queries disclose as much as study-level ones."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelGet,
    )

    gateway = gateway_factory(peers=[{"ae_title": "PACS", "host": "127.0.0.1", "permissions": ["echo", "store"]}])
    ae = AE(ae_title="PACS")
    patient_root = (PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelMove,
                    PatientRootQueryRetrieveInformationModelGet)
    for sop in (Verification, *patient_root):
        ae.add_requested_context(sop)
    assoc = ae.associate("127.0.0.1", gateway.dicom.port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == {Verification} and rejected == {str(sop) for sop in patient_root}
