"""Storage SCU against real peers over TCP: DCMTK storescp and a pynetdicom SCP with set statuses."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from conf.settings import DicomDestination
from dicom_node.storage_scu import (
    DeliveryRejectedError,
    DeliveryUnavailableError,
    StatusCategory,
    classify_store_status,
    requested_contexts,
    send_instance,
)
from tests.conftest import copy_with_new_uids, sample
from tests.dicom_peers import StatusScp, StoreScp, free_port

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


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
        (ExplicitVRLittleEndian, [(CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]),
        (ImplicitVRLittleEndian, [(CT, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])]),
        (RLELossless, [(CT, [RLELossless]), (CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]),
    ],
)
def test_requested_contexts(stored: str, expected: list[tuple[str, list[str]]]) -> None:
    assert requested_contexts(CT, stored) == expected


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
