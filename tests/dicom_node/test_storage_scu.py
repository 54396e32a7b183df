"""Storage SCU against real peers over TCP: DCMTK storescp and a pynetdicom SCP with set statuses.

The transfer-syntax tests send our real report objects — a Comprehensive 3D SR built by
``build_ai_sr``, the RGB Secondary Capture built by ``build_summary_image`` — and a real radiograph
to ``storescp`` run with each ``+x`` option, and with configuration profiles that accept a single
syntax, and check the file storescp wrote: it parses (dcmdump and pydicom), carries the negotiated
syntax, keeps the SOP Instance UID and decodes to identical pixel values.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from conf.settings import DicomDestination
from dicom_node.sr import build_ai_sr
from dicom_node.storage_scu import (
    DeliveryRejectedError,
    DeliveryUnavailableError,
    StatusCategory,
    classify_store_status,
    requested_contexts,
    send_instance,
)
from dicom_node.summary_image import build_summary_image
from dicom_node.tcp import PduReader, low_latency_tcp
from tests.conftest import copy_with_new_uids, sample, sample_ai_result
from tests.dicom_peers import StatusScp, StoreScp, free_port

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
NATIVE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
ENCODABLE = [RLELossless, JPEGLSLossless, JPEG2000Lossless]  # pydicom 3 + pylibjpeg/pyjpegls plugins
RESULT = sample_ai_result()


def _dest(port: int, ae_title: str = "STORESCP") -> DicomDestination:
    return DicomDestination(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port)


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (0x0000, StatusCategory.SUCCESS),
        (0x0001, StatusCategory.WARNING),
        (0xB000, StatusCategory.WARNING),  # PS3.4 B.2.3 coercion of data elements
        (0xB007, StatusCategory.WARNING),  # data set does not match SOP class (warning)
        (0xA700, StatusCategory.TRANSIENT),  # refused: out of resources
        (0xA7FF, StatusCategory.TRANSIENT),
        (0x0110, StatusCategory.TRANSIENT),  # PS3.7 C processing failure
        (0x0213, StatusCategory.TRANSIENT),  # resource limitation
        (0xA900, StatusCategory.PERMANENT),  # error: data set does not match SOP class
        (0xC000, StatusCategory.PERMANENT),  # error: cannot understand
        (0xCFFF, StatusCategory.PERMANENT),
        (0x0122, StatusCategory.PERMANENT),  # SOP class not supported
        (0x0124, StatusCategory.PERMANENT),  # not authorized
        (0xD123, StatusCategory.TRANSIENT),  # unknown failure: bounded retries
    ],
)
def test_classify_store_status(status: int, category: StatusCategory) -> None:
    assert classify_store_status(status) is category


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (ExplicitVRLittleEndian, [(CT, NATIVE), *((CT, [ts]) for ts in ENCODABLE)]),
        (
            ImplicitVRLittleEndian,
            [(CT, [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]),
             *((CT, [ts]) for ts in ENCODABLE)],
        ),
        (RLELossless, [(CT, [RLELossless]), (CT, NATIVE), (CT, [JPEGLSLossless]), (CT, [JPEG2000Lossless])]),
    ],
)
def test_requested_contexts(stored: str, expected: list[tuple[str, list[str]]]) -> None:
    """Stored syntax first (alone when compressed), every native encoding in one context for the
    SCP to choose from, then one context per lossless syntax we can encode."""
    assert requested_contexts(CT, stored, has_pixel_data=True) == expected


def test_requested_contexts_without_pixel_data_offer_lossless_labels_only() -> None:
    sr = "1.2.840.10008.5.1.4.1.1.88.34"
    contexts = requested_contexts(sr, ExplicitVRLittleEndian, has_pixel_data=False)
    assert contexts == [(sr, NATIVE), *((sr, [ts]) for ts in [*ENCODABLE, JPEGLosslessSV1])]
    assert not any(UID(ts).is_encapsulated and not ts.endswith((".4.57", ".4.70", ".4.80", ".4.90", ".5"))
                   for _, syntaxes in contexts for ts in syntaxes)  # nothing lossy is ever offered


def test_sends_to_storescp_unchanged(tmp_path: Path) -> None:
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    with StoreScp(tmp_path / "out") as scp:
        result = send_instance(path, _dest(scp.port), "PNEUMO", 10)
        received = scp.received()
    sent = pydicom.dcmread(path)
    assert result.status == 0x0000 and not result.warning and not result.transcoded
    assert result.sop_instance_uid == sent.SOPInstanceUID
    [arrived] = received
    got = pydicom.dcmread(arrived)
    assert got.SOPInstanceUID == sent.SOPInstanceUID
    assert got.PixelData == sent.PixelData


def test_transcodes_only_when_stored_syntax_refused(tmp_path: Path) -> None:
    """storescp accepts only uncompressed syntaxes: the RLE object is decoded, same UID."""
    path = copy_with_new_uids(sample("MR_small_RLE.dcm"), tmp_path / "in")
    with StoreScp(tmp_path / "out") as scp:
        result = send_instance(path, _dest(scp.port), "PNEUMO", 10)
        [arrived] = scp.received()
    original = pydicom.dcmread(path)
    got = pydicom.dcmread(arrived)
    assert result.transcoded and result.transfer_syntax_uid == ExplicitVRLittleEndian
    assert got.SOPInstanceUID == original.SOPInstanceUID  # same instance, other encoding
    assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert np.array_equal(got.pixel_array, original.pixel_array)


def test_sends_stored_syntax_when_accepted(tmp_path: Path) -> None:
    path = copy_with_new_uids(sample("MR_small_RLE.dcm"), tmp_path / "in")
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    with StatusScp([MR], [RLELossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]) as scp:
        result = send_instance(path, _dest(scp.port, scp.ae_title), "PNEUMO", 10)
    assert not result.transcoded
    assert scp.received == {uid: RLELossless}


def test_status_verdicts(tmp_path: Path) -> None:
    paths = [copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in") for _ in range(4)]
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    statuses = {uids[0]: 0xB000, uids[1]: 0xA700, uids[2]: 0xC000, uids[3]: 0xA900}
    with StatusScp([CT], [ExplicitVRLittleEndian], statuses=statuses) as scp:
        dest = _dest(scp.port, scp.ae_title)
        warned = send_instance(paths[0], dest, "PNEUMO", 10)
        with pytest.raises(DeliveryUnavailableError) as busy:
            send_instance(paths[1], dest, "PNEUMO", 10)
        with pytest.raises(DeliveryRejectedError) as refused:
            send_instance(paths[2], dest, "PNEUMO", 10)
        with pytest.raises(DeliveryRejectedError) as mismatch:
            send_instance(paths[3], dest, "PNEUMO", 10)
    assert warned.warning and warned.status == 0xB000  # stored, with a warning: delivered
    assert busy.value.transient and busy.value.dimse_status == 0xA700
    assert not refused.value.transient and refused.value.dimse_status == 0xC000
    assert mismatch.value.dimse_status == 0xA900


def test_unreachable_destination_is_transient(tmp_path: Path) -> None:
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    with pytest.raises(DeliveryUnavailableError) as caught:
        send_instance(path, _dest(free_port()), "PNEUMO", 5)
    assert caught.value.dimse_status is None


def test_association_rejected_is_transient(tmp_path: Path) -> None:
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    scp = StatusScp([CT], [ExplicitVRLittleEndian], require_called_aet=True)
    with scp, pytest.raises(DeliveryUnavailableError, match="rejected"):
        send_instance(path, _dest(scp.port, "WRONGAE"), "PNEUMO", 5)
    assert scp.received == {}


def test_sop_class_not_accepted_is_permanent(tmp_path: Path) -> None:
    path = copy_with_new_uids(sample("MR_small.dcm"), tmp_path / "in")
    scp = StatusScp([CT], [ExplicitVRLittleEndian])
    with scp, pytest.raises(DeliveryRejectedError, match="presentation context"):
        send_instance(path, _dest(scp.port, scp.ae_title), "PNEUMO", 5)


def test_unreadable_stored_file_is_permanent(tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom at all")
    with pytest.raises(DeliveryRejectedError, match="cannot be read"):
        send_instance(broken, _dest(free_port()), "PNEUMO", 5)
    with pytest.raises(DeliveryRejectedError):
        send_instance(tmp_path / "missing.dcm", _dest(free_port()), "PNEUMO", 5)


def test_silent_peer_times_out_as_transient(tmp_path: Path) -> None:
    """A peer that accepts the TCP connection and never answers the A-ASSOCIATE-RQ."""
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        started = time.monotonic()
        with pytest.raises(DeliveryUnavailableError):
            send_instance(path, _dest(listener.getsockname()[1]), "PNEUMO", 1)
        assert time.monotonic() - started < 10


# --- transfer syntaxes a real storescp insists on -------------------------------------------------

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
# What storescp 3.6.x picks from our native context (the other +x options accept their compressed
# preference *and* the native syntaxes, so the stored Explicit VR LE goes unchanged).
PICKED = {"+xb": ExplicitVRBigEndian, "+xd": DeflatedExplicitVRLittleEndian, "+xi": ImplicitVRLittleEndian}
X_OPTIONS = ["+x=", "+xe", "+xb", "+xs", "+xy", "+xx", "+xv", "+xw", "+xt", "+xu", "+xm", "+xr", "+xd", "+xi", "+xa"]


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Our SR and RGB summary SC for a real radiograph, and that radiograph (16-bit MONOCHROME1),
    each stored as Explicit VR Little Endian like the gateway stores them."""
    directory = tmp_path_factory.mktemp("objects")
    radiograph = copy_with_new_uids(sample("RG1_UNCR.dcm"), directory)
    source = pydicom.dcmread(radiograph)
    display = np.random.default_rng(7).random((320, 256)).astype(np.float32)
    paths = {"radiograph": radiograph}
    for name, built in (("sr", build_ai_sr(source, RESULT)), ("sc", build_summary_image(source, display, RESULT))):
        paths[name] = directory / f"{name}.dcm"
        built.save_as(paths[name], enforce_file_format=True)
    return paths


def _fresh(path: Path, directory: Path) -> tuple[Path, Dataset]:
    """A copy of *path* under a new SOP Instance UID (storescp names files by it)."""
    copy = copy_with_new_uids(path, directory)
    return copy, pydicom.dcmread(copy)


def _dcmdump_parses(path: Path) -> None:
    if shutil.which("dcmdump") is None:
        pytest.skip("DCMTK dcmdump not installed")
    done = subprocess.run(["dcmdump", "-q", "+E", str(path)], capture_output=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def _check_arrived(arrived: Path, sent: Dataset, syntax: str) -> Dataset:
    """The file storescp wrote parses, carries *syntax*, is the same instance with the same content."""
    _dcmdump_parses(arrived)
    got = pydicom.dcmread(arrived)
    assert got.file_meta.TransferSyntaxUID == syntax
    assert got.SOPInstanceUID == sent.SOPInstanceUID and got.SOPClassUID == sent.SOPClassUID
    if "PixelData" in sent:
        # same kind and width; a Big Endian file decodes to a big-endian array of the same values
        got_type, sent_type = got.pixel_array.dtype, sent.pixel_array.dtype
        assert (got_type.kind, got_type.itemsize) == (sent_type.kind, sent_type.itemsize)
        assert np.array_equal(got.pixel_array, sent.pixel_array)
        assert got.PhotometricInterpretation == sent.PhotometricInterpretation
    else:
        assert got == sent  # every element, sequences included, survives the re-encoding
    return got


@pytest.mark.parametrize("option", X_OPTIONS)
@pytest.mark.parametrize("kind", ["sr", "sc", "radiograph"])
def test_storescp_transfer_syntax_options(option: str, kind: str, objects: dict[str, Path], tmp_path: Path) -> None:
    """Every storescp ``+x`` preference gets the object, in the syntax it negotiated."""
    path, sent = _fresh(objects[kind], tmp_path / "in")
    with StoreScp(tmp_path / "out", options=(option,)) as scp:
        result = send_instance(path, _dest(scp.port), "PNEUMO", 30)
        [arrived] = scp.received()
    if option == "+xa":  # "accept all": which native syntax it prefers depends on the DCMTK build
        assert result.transfer_syntax_uid in NATIVE
    expected = result.transfer_syntax_uid if option == "+xa" else PICKED.get(option, ExplicitVRLittleEndian)
    assert result.status == 0x0000 and result.transfer_syntax_uid == expected
    assert result.transcoded == (expected != ExplicitVRLittleEndian)
    _check_arrived(arrived, sent, expected)


def _single_syntax_profile(directory: Path, dcmtk_name: str) -> tuple[str, ...]:
    """storescp options for a configuration profile accepting our SOP classes in one syntax only."""
    classes = ["Comprehensive3DSRStorage", "SecondaryCaptureImageStorage", "ComputedRadiographyImageStorage"]
    lines = ["[[TransferSyntaxes]]", "[Only]", f"TransferSyntax1 = {dcmtk_name}", "[[PresentationContexts]]", "[OnlyOne]"]
    lines += [f"PresentationContext{n} = {sop}\\Only" for n, sop in enumerate(classes, start=1)]
    lines += ["[[Profiles]]", "[OnlyOne]", "PresentationContexts = OnlyOne"]
    config = directory / f"storescp-{dcmtk_name.replace(':', '-')}.cfg"
    directory.mkdir(parents=True, exist_ok=True)
    config.write_text("\n".join(lines) + "\n")
    return ("-xf", str(config), "OnlyOne")


@pytest.mark.parametrize(
    ("dcmtk_name", "syntax", "dcmtk_decoder"),
    [
        ("RLELossless", RLELossless, "dcmdrle"),
        ("JPEGLSLossless", JPEGLSLossless, "dcmdjpls"),
        ("JPEG2000LosslessOnly", JPEG2000Lossless, None),  # DCMTK has no free JPEG 2000 codec
        ("LittleEndianImplicit", ImplicitVRLittleEndian, None),
        ("OppositeEndianExplicit", ExplicitVRBigEndian, None),
        ("DeflatedLittleEndianExplicit", DeflatedExplicitVRLittleEndian, None),
    ],
)
@pytest.mark.parametrize("kind", ["sr", "sc", "radiograph"])
def test_peer_accepting_one_syntax_only(
    dcmtk_name: str, syntax: str, dcmtk_decoder: str | None, kind: str, objects: dict[str, Path], tmp_path: Path
) -> None:
    """A peer that accepts a single syntax gets it: compressed losslessly when it is an encapsulated
    one (and DCMTK's own decoder agrees with pydicom's), re-encoded when native."""
    path, sent = _fresh(objects[kind], tmp_path / "in")
    with StoreScp(tmp_path / "out", options=_single_syntax_profile(tmp_path, dcmtk_name)) as scp:
        result = send_instance(path, _dest(scp.port), "PNEUMO", 60)
        [arrived] = scp.received()
    assert result.status == 0x0000 and result.transcoded and result.transfer_syntax_uid == syntax
    _check_arrived(arrived, sent, syntax)
    if dcmtk_decoder and "PixelData" in sent and shutil.which(dcmtk_decoder):
        decoded = tmp_path / "decoded.dcm"
        subprocess.run([dcmtk_decoder, str(arrived), str(decoded)], check=True, capture_output=True, timeout=120)
        assert np.array_equal(pydicom.dcmread(decoded).pixel_array, sent.pixel_array)


@pytest.mark.parametrize("dcmtk_name", ["MPEG2MainProfile@MainLevel", "JPEGBaseline"])
def test_peer_accepting_only_what_we_cannot_produce_is_permanent(
    dcmtk_name: str, objects: dict[str, Path], tmp_path: Path
) -> None:
    """Lossy-only peers: nothing is sent, and the error names what was offered and answered."""
    path, _ = _fresh(objects["sc"], tmp_path / "in")
    with StoreScp(tmp_path / "out", options=_single_syntax_profile(tmp_path, dcmtk_name)) as scp:
        with pytest.raises(DeliveryRejectedError) as caught:
            send_instance(path, _dest(scp.port), "PNEUMO", 30)
        assert scp.received() == []
    message = str(caught.value)
    assert not caught.value.transient
    assert "Secondary Capture Image Storage" in message and "Transfer Syntax(es) Not Supported" in message
    for offered in ("Explicit VR Big Endian", "Deflated Explicit VR Little Endian", "RLE Lossless"):
        assert offered in message


def test_peer_accepting_compressed_syntax_we_cannot_fill_names_it(tmp_path: Path) -> None:
    """The peer accepts only JPEG 2000 Lossless, but these pixels (32-bit) exceed what the
    encoder takes: a permanent rejection naming the accepted syntax, nothing sent."""

    def to_32_bit(ds: Dataset) -> None:
        pixels = ds.pixel_array.astype(np.uint32) << 16
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"

    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in", mutate=to_32_bit)
    with StatusScp([CT], [JPEG2000Lossless]) as scp:
        with pytest.raises(DeliveryRejectedError, match="accepted JPEG 2000 Image Compression") as caught:
            send_instance(path, _dest(scp.port, scp.ae_title), "PNEUMO", 30)
        assert scp.received == {}
    assert "encoder failed" in str(caught.value) or "round-trip" in str(caught.value)


def test_big_endian_round_trip_keeps_the_sop_instance_uid(tmp_path: Path) -> None:
    """A re-send to a Big Endian peer is the same instance: same UID, same pixels (PS3.5 §10)."""
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in", sop_uid=generate_uid())
    sent = pydicom.dcmread(path)
    with StoreScp(tmp_path / "out", options=("+xb",)) as scp:
        first = send_instance(path, _dest(scp.port), "PNEUMO", 30)
        second = send_instance(path, _dest(scp.port), "PNEUMO", 30)
        [arrived] = scp.received()  # storescp overwrites by SOP Instance UID: one file
    assert first.transfer_syntax_uid == second.transfer_syntax_uid == ExplicitVRBigEndian
    _check_arrived(arrived, sent, ExplicitVRBigEndian)


def test_delivery_associations_send_without_nagle_and_ack_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our SCU socket has TCP_NODELAY from the moment it connects (before A-ASSOCIATE-RQ), and
    reads through a :class:`PduReader` (quick ACKs): with Nagle on either side, each C-STORE waited
    for a delayed ACK (~45 ms per report)."""
    seen: list[tuple[int, bool]] = []

    def recording(event: Any) -> None:
        low_latency_tcp(event)
        transport = event.assoc.dul.socket
        seen.append((transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), isinstance(transport.recv, PduReader)))

    monkeypatch.setattr("dicom_node.storage_scu.low_latency_tcp", recording)
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    with StoreScp(tmp_path / "out") as scp:
        assert send_instance(path, _dest(scp.port), "PNEUMO", 10).status == 0x0000
    assert seen == [(1, True)]
