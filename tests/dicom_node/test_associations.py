"""Delivery associations kept open and reused (dicom_node/associations.py), against real peers:
DCMTK ``storescp`` (its verbose log counts associations) and a pynetdicom SCP that can drop them."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from conf.settings import DicomDestination
from dicom_node import storage_scu
from dicom_node.associations import AssociationPool, covers, merged
from dicom_node.sr import build_ai_sr
from dicom_node.storage_scu import DeliveryUnavailableError, send_instance
from dicom_node.summary_image import build_summary_image
from tests.conftest import copy_with_new_uids, sample, sample_ai_result, wait_until
from tests.dicom_peers import StatusScp, StoreScp

CT = "1.2.840.10008.5.1.4.1.1.2"
RESULT = sample_ai_result()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _dest(port: int, ae_title: str = "STORESCP") -> DicomDestination:
    return DicomDestination(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port)


def _cts(tmp_path: Path, count: int) -> list[Path]:
    return [copy_with_new_uids(sample("CT_small.dcm"), tmp_path / f"in{i}") for i in range(count)]


def _storescp_log(scp: StoreScp) -> str:
    return (scp.out_dir.parent / f"storescp-{scp.port}.log").read_text(errors="replace")


def test_objects_of_one_kind_share_one_association_released_when_idle(tmp_path: Path) -> None:
    clock = FakeClock()
    pool = AssociationPool(5.0, clock=clock)
    with StoreScp(tmp_path / "out", options=("-v",)) as scp:
        for path in _cts(tmp_path, 3):
            assert send_instance(path, _dest(scp.port), "PNEUMO", 10, pool).status == 0x0000
        assert len(scp.received()) == 3
        assert _storescp_log(scp).count("Association Acknowledged") == 1
        assert pool.idle_count == 1
        clock.now += 4.9
        assert pool.release_idle() == 0  # still young
        clock.now += 0.2
        assert pool.release_idle() == 1 and pool.idle_count == 0
        wait_until(lambda: "Association Release" in _storescp_log(scp), 10, "A-RELEASE")  # a normal release, not an abort
        assert "Abort" not in _storescp_log(scp)


def test_one_association_comes_to_carry_our_sr_and_summary_image(tmp_path: Path) -> None:
    """The first summary image needs contexts the SR's association did not propose: that one is
    released (never two idle associations to a PACS that may serve one at a time) and the new one
    proposes both kinds, so a burst alternating SR and SC opens two associations in all."""
    pool = AssociationPool(5.0)
    paths = []
    for i in range(2):
        radiograph = copy_with_new_uids(sample("RG1_UNCR.dcm"), tmp_path / f"rg{i}")
        source = pydicom.dcmread(radiograph)
        display = np.random.default_rng(i).random((64, 64)).astype(np.float32)
        for name, built in (("sr", build_ai_sr(source, RESULT)), ("sc", build_summary_image(source, display, RESULT))):
            paths.append(tmp_path / f"{name}{i}.dcm")
            built.save_as(paths[-1], enforce_file_format=True)
    with StoreScp(tmp_path / "out", options=("-v",)) as scp:
        for path in paths:  # SR, SC, SR, SC
            assert send_instance(path, _dest(scp.port), "PNEUMO", 10, pool).status == 0x0000
        assert len(scp.received()) == 4
        assert _storescp_log(scp).count("Association Acknowledged") == 2
        assert pool.idle_count == 1
        pool.close()


def test_zero_idle_seconds_opens_one_association_per_object(tmp_path: Path) -> None:
    pool = AssociationPool(0.0)
    with StoreScp(tmp_path / "out", options=("-v",)) as scp:
        for path in _cts(tmp_path, 2):
            send_instance(path, _dest(scp.port), "PNEUMO", 10, pool)
        wait_until(lambda: _storescp_log(scp).count("Association Release") == 2, 10, "two A-RELEASEs")
        assert _storescp_log(scp).count("Association Acknowledged") == 2
        assert pool.idle_count == 0


@pytest.mark.parametrize(
    "drop",
    [
        pytest.param(lambda assoc: assoc.abort(), id="A-ABORT"),
        pytest.param(lambda assoc: assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR), id="connection-broken"),
    ],
)
def test_an_association_the_peer_dropped_while_idle_is_replaced(tmp_path: Path, drop: Callable[[Any], None]) -> None:
    pool = AssociationPool(30.0)
    first, second = _cts(tmp_path, 2)
    with StatusScp([CT], [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) as scp:
        send_instance(first, _dest(scp.port, scp.ae_title), "PNEUMO", 10, pool)
        [ours] = scp.active_associations()
        drop(ours)  # the PACS's side of our idle association
        assert send_instance(second, _dest(scp.port, scp.ae_title), "PNEUMO", 10, pool).status == 0x0000
    assert len(scp.received) == 2


def test_a_send_that_fails_on_a_reused_association_is_sent_again_over_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer may drop an idle association just as we use it: the object goes again at once
    over a new association instead of waiting for the outbox's backoff."""
    real_store = storage_scu._store
    failures = iter([DeliveryUnavailableError("association with 'pacs' lost before sending")])

    def store_failing_once_when_reused(assoc: Any, *args: Any) -> Any:
        if pool.idle_count == 0 and assoc is reused_assoc[0]:
            failure = next(failures, None)
            if failure is not None:
                raise failure
        return real_store(assoc, *args)

    pool = AssociationPool(30.0)
    reused_assoc: list[Any] = [None]
    first, second = _cts(tmp_path, 2)
    with StoreScp(tmp_path / "out", options=("-v",)) as scp:
        send_instance(first, _dest(scp.port), "PNEUMO", 10, pool)
        reused_assoc[0] = pool._idle[next(iter(pool._idle))].assoc
        monkeypatch.setattr(storage_scu, "_store", store_failing_once_when_reused)
        assert send_instance(second, _dest(scp.port), "PNEUMO", 10, pool).status == 0x0000
        assert len(scp.received()) == 2
        assert _storescp_log(scp).count("Association Acknowledged") == 2
        pool.close()


def test_a_peer_that_is_down_fails_as_unavailable_and_keeps_nothing(tmp_path: Path) -> None:
    pool = AssociationPool(30.0)
    scp = StoreScp(tmp_path / "out")
    with pytest.raises(DeliveryUnavailableError):
        send_instance(_cts(tmp_path, 1)[0], _dest(scp.port), "PNEUMO", 5, pool)
    assert pool.idle_count == 0


def test_close_releases_everything(tmp_path: Path) -> None:
    pool = AssociationPool(30.0)
    with StoreScp(tmp_path / "out", options=("-v",)) as scp:
        send_instance(_cts(tmp_path, 1)[0], _dest(scp.port), "PNEUMO", 10, pool)
        pool.close()
        assert pool.idle_count == 0
        wait_until(lambda: "Association Release" in _storescp_log(scp), 10, "A-RELEASE")


SR = ("1.2.840.10008.5.1.4.1.1.88.34", ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"))
SC = ("1.2.840.10008.5.1.4.1.1.7", ("1.2.840.10008.1.2.1",))


@pytest.mark.parametrize(
    ("proposed", "needed", "covered", "next_proposal"),
    [
        ((SR,), (SR,), True, (SR,)),
        ((SR, SC), (SC,), True, (SC, SR)),
        ((SR,), (SC,), False, (SC, SR)),
        ((SR,), ((SR[0], ("1.2.840.10008.1.2.5",)),), False, ((SR[0], ("1.2.840.10008.1.2.5",)), SR)),
        (tuple((f"1.2.3.{i}", ("1.2.840.10008.1.2",)) for i in range(128)), (SC,), False, (SC,)),  # no room: SC alone
    ],
)
def test_covers_and_merged(proposed: Any, needed: Any, covered: bool, next_proposal: Any) -> None:
    assert covers(proposed, needed) is covered
    assert merged(proposed, needed) == next_proposal
