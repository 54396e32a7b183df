"""Attacks and faults on the DICOM listener of a real ``pneumo serve`` with the shipped
configuration (two acceptor processes), from raw sockets and real DICOM clients.

* half-open connections (an A-ASSOCIATE-RQ missing its last bytes) are closed after the ARTIM
  timeout (``dicom.association_request_timeout``, PS3.8 9.1.5), or sooner when newer connections
  from the same address displace them, and never keep a configured peer out;
* bare connect/close frees its slot at once: the next 100 real associations are all accepted;
* a first PDU that is not an A-ASSOCIATE-RQ is answered with an A-ABORT (PS3.8 Sta2, AA-1);
* a malformed A-ASSOCIATE-RQ that pynetdicom would fail on is refused (A-ASSOCIATE-RJ or A-ABORT)
  and closed at once by the listener; one too long to check first is still answered and closed;
* a burst of refused requests whose senders keep their ends open never locks a configured peer
  out (no Sta13 association holds a ``maximum_associations`` slot);
* a partial A-ASSOCIATE-RQ followed by a half-close (FIN) is dropped at once, not after ARTIM;
* C-STORE transfers aborted mid-dataset leave no partial file in ``data_dir/tmp``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

from conf.settings import DicomSettings
from dicom_node.listener import (
    A_ABORT_INVALID_PDU,
    PEEK_LIMIT,
    REJECT_APPLICATION_CONTEXT,
    REJECT_NO_REASON,
    REJECT_PROTOCOL_VERSION,
    AdmissionLimits,
    FirstPdu,
    PendingConnections,
    await_associate_rq,
    check_associate_rq,
)
from tests.conftest import copy_with_new_uids, sample
from tests.dicom_node import pdu_fuzz as fz
from tests.dicom_node.shipped_serve import echo, shipped, wait_closed
from tests.gateway.serve_process import ServeProcess, pneumo

__all__ = ["shipped"]  # the fixture, imported for pytest

pytestmark = pytest.mark.slow

#: The shipped ARTIM timeout, read from the defaults the shipped pneumo.toml does not override.
ARTIM = DicomSettings().association_request_timeout
#: Slack for a shared 2-core machine: the server must close within ARTIM + this.
SLACK = 15.0


def _partial_associate_rq() -> bytes:
    """The first 74 bytes of an A-ASSOCIATE-RQ (PS3.8 9.3.2) announcing 300: never completed."""
    fixed = struct.pack(">HH16s16s32s", 1, 0, b"PNEUMO".ljust(16), b"ECHOSCU".ljust(16), b"\x00" * 32)
    return struct.pack(">BBL", 0x01, 0x00, 300) + fixed


def _open(port: int, payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if payload:
        sock.sendall(payload)
    return sock


def test_half_open_associations_time_out_and_never_lock_out_a_peer(shipped: ServeProcess) -> None:
    port = shipped.dicom_port
    half_open = [_open(port, _partial_associate_rq()) for _ in range(100)]
    try:
        # While all 100 are still open on our side, real peers associate at once.
        assert [echo(port) for _ in range(10)] == [0x0000] * 10
        closed = wait_closed(half_open, timeout=ARTIM + SLACK + 30)
    finally:
        for sock in half_open:
            sock.close()
    assert len(closed) == 100, "every half-open connection must be closed by the server"
    assert max(closed.values()) <= ARTIM + SLACK
    # The newest few per acceptor process waited for the timer; the rest were displaced at once.
    assert sum(1 for held in closed.values() if held < ARTIM / 2) >= 80


def test_a_configured_peer_gets_in_during_a_half_open_flood(shipped: ServeProcess) -> None:
    port = shipped.dicom_port
    stop = threading.Event()
    flood: list[socket.socket] = []

    def attack() -> None:
        while not stop.is_set() and len(flood) < 2000:
            try:
                flood.append(_open(port, _partial_associate_rq()))
            except OSError:
                pass
            stop.wait(0.05)

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        # More half-open connections than both processes have association slots (2 x 32).
        assert _wait_for(lambda: len(flood) >= 100, 60)
        statuses = [echo(port) for _ in range(20)]
    finally:
        stop.set()
        attacker.join(30)
        for sock in flood:
            sock.close()
    assert statuses == [0x0000] * 20


def test_bare_connect_close_frees_its_slot_at_once(shipped: ServeProcess) -> None:
    port = shipped.dicom_port
    for _ in range(100):
        _open(port).close()
    # 100 real associations right away: more than both acceptor processes' 2 x 32 slots, so any
    # slot still held by a closed socket would show up as a "Local Limit Exceeded" rejection.
    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(lambda _: echo(port), range(100)))
    assert statuses == [0x0000] * 100


def test_a_first_pdu_other_than_associate_rq_is_aborted_at_once(shipped: ServeProcess) -> None:
    sock = _open(shipped.dicom_port, struct.pack(">BBL", 0x04, 0x00, 4) + b"\x00\x00\x00\x00")  # P-DATA-TF
    try:
        sock.settimeout(ARTIM / 2)
        reply = sock.recv(64)
        assert reply[:1] == b"\x07", "an A-ABORT PDU"
        assert sock.recv(64) == b""  # then the server closes
    finally:
        sock.close()


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _rq(contexts: list[fz.Context], calling: str = "ECHOSCU") -> bytes:
    return fz.associate_rq(calling, "PNEUMO", contexts)


def _empty_ts_rq(calling: str = "ECHOSCU") -> bytes:
    """A presentation context with an abstract syntax and no transfer syntax (PS3.8 9.3.2.2
    requires one or more): pynetdicom's negotiation raised IndexError on it and hung the peer."""
    return _rq([fz.Context(1, fz.VERIFICATION, ())], calling)


def test_an_associate_rq_pynetdicom_fails_on_is_rejected_and_closed_at_once(shipped: ServeProcess) -> None:
    for rq in (_empty_ts_rq(), _rq([]), _rq([fz.Context(1, fz.VERIFICATION, (fz.IMPLICIT_VR_LE,))] * 2)):
        peer = fz.Peer(shipped.dicom_port, ARTIM / 2)
        try:
            started = time.monotonic()
            peer.send(rq)
            answer = peer.read()
            assert (answer.kind, answer.body[1:4]) == ("associate-rj", REJECT_NO_REASON[7:10])
            assert peer.read().kind == "closed", "closed right after the A-ASSOCIATE-RJ, not held in Sta13"
            assert time.monotonic() - started < ARTIM / 2
        finally:
            peer.close()
    assert echo(shipped.dicom_port) == 0x0000


def test_an_associate_rq_too_long_to_check_first_is_still_answered_and_closed(shipped: ServeProcess) -> None:
    """Longer than PEEK_LIMIT, so pynetdicom reads it unchecked and fails on the last context: the
    request handler still aborts and closes the connection instead of leaving the peer hanging."""
    padding = tuple(f"1.2.826.0.1.3680043.9.7433.99.{n:034d}" for n in range(10))
    contexts = [fz.Context(2 * n + 1, CT_IMAGE_STORAGE, padding) for n in range(120)]
    rq = _rq([*contexts, fz.Context(255, fz.VERIFICATION, ())])
    assert len(rq) > PEEK_LIMIT
    peer = fz.Peer(shipped.dicom_port, ARTIM + SLACK)
    try:
        peer.send(rq)
        answers = [peer.read()]
        if answers[0].kind != "closed":
            answers.append(peer.read())
        assert [a.kind for a in answers][-1] == "closed"
        assert answers[0].kind in ("abort", "associate-rj", "closed")
    finally:
        peer.close()
    assert echo(shipped.dicom_port) == 0x0000


def test_a_burst_of_refused_associate_rqs_held_open_never_locks_a_peer_out(shipped: ServeProcess) -> None:
    """64 well-framed requests, refused by the listener (malformed) or by pynetdicom and the node
    (calling AE not configured), whose senders never close: a configured peer gets in at once.
    Both acceptor processes together have 2 x 32 association slots."""
    port = shipped.dicom_port
    verification = [fz.Context(1, fz.VERIFICATION, (fz.IMPLICIT_VR_LE,))]
    stranger = _rq(verification, "NOTAPEER")
    blank_calling = _rq(verification, " ")  # undecodable: pynetdicom answered A-ABORT (Evt19)
    requests = [(_empty_ts_rq(), stranger, blank_calling, _rq([]))[n % 4] for n in range(64)]
    held: list[fz.Peer] = []
    try:
        for rq in requests:
            peer = fz.Peer(port, ARTIM)
            held.append(peer)
            peer.send(rq)
        for peer in held:
            assert peer.read().kind in ("associate-rj", "abort")  # answered; the socket stays open here
        assert [echo(port) for _ in range(5)] == [0x0000] * 5
    finally:
        for peer in held:
            peer.close()


def _long_undecodable_rq() -> bytes:
    """Longer than PEEK_LIMIT (so only pynetdicom decodes it), and undecodable: its User
    Information item claims 100 bytes more than the PDU holds. pynetdicom answers A-ABORT (Evt19)
    and its association thread then waits for a request that never comes."""
    padding = tuple(f"1.2.826.0.1.3680043.9.7433.99.{n:034d}" for n in range(10))
    rq = _rq([fz.Context(2 * n + 1, CT_IMAGE_STORAGE, padding) for n in range(120)])
    user_information = rq.rindex(b"\x50\x00")
    length = int.from_bytes(rq[user_information + 2 : user_information + 4], "big")
    return rq[: user_information + 2] + (length + 100).to_bytes(2, "big") + rq[user_information + 4 :]


def test_a_burst_of_undecodable_long_associate_rqs_held_open_never_locks_a_peer_out(shipped: ServeProcess) -> None:
    port = shipped.dicom_port
    rq = _long_undecodable_rq()
    assert len(rq) > PEEK_LIMIT
    held: list[fz.Peer] = []
    try:
        for _ in range(64):
            peer = fz.Peer(port, ARTIM + SLACK)
            held.append(peer)
            peer.send(rq)
        for peer in held:
            assert peer.read().kind in ("abort", "associate-rj", "closed")  # answered; our end stays open
        assert [echo(port) for _ in range(5)] == [0x0000] * 5
        # ... and every one of them is closed by the server soon (ARTIM in Sta13), not after the ACSE timeout.
        started = time.monotonic()
        for peer in held:
            while not peer.peer_closed and peer.read().kind != "closed":
                pass
        assert time.monotonic() - started < ARTIM
    finally:
        for peer in held:
            peer.close()


def test_a_partial_associate_rq_then_half_close_is_dropped_at_once(shipped: ServeProcess) -> None:
    sockets = [_open(shipped.dicom_port, _partial_associate_rq()) for _ in range(5)]
    try:
        for sock in sockets:
            sock.shutdown(socket.SHUT_WR)
        closed = wait_closed(sockets, timeout=ARTIM + SLACK)
    finally:
        for sock in sockets:
            sock.close()
    assert len(closed) == 5 and max(closed.values()) < ARTIM / 2


def _store_fragments(path: Path, context_id: int, max_pdu: int) -> list[P_DATA]:
    """The P-DATA-TF PDUs of a C-STORE-RQ for *path*, as a Storage SCU would send them."""
    ds = pydicom.dcmread(path)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    encoded = encode(ds, False, True)
    assert encoded is not None
    request.DataSet = BytesIO(encoded)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(context_id, max_pdu))


def _temp_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "tmp").glob("tmp*.dcm"))


def _wait_for(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_transfers_aborted_mid_dataset_leave_no_partial_files(shipped: ServeProcess, tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    image = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 60
    ae.add_requested_context(pydicom.dcmread(image).SOPClassUID, ExplicitVRLittleEndian)
    for attempt in range(20):
        assoc = ae.associate("127.0.0.1", shipped.dicom_port, ae_title="PNEUMO")
        assert assoc.is_established
        context_id = next(iter(assoc._accepted_cx))
        for fragment in _store_fragments(image, context_id, 4096)[:-1]:  # all but the data set's last
            assoc.dul.send_pdu(fragment)
        assert _wait_for(lambda: _temp_files(data_dir), 30), "the server writes the arriving data set"
        if attempt % 2:  # the sender dies: the connection drops without an A-ABORT
            assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
            assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
            assoc.join(30)
        else:
            assoc.abort()
        assert _wait_for(lambda: not _temp_files(data_dir), 30), "partial file removed when the association ended"
    assert pneumo(shipped.config, "instances", "--json").stdout.strip() == ""


# -- the admission bookkeeping on its own (socket pairs, no server) ------------------------------


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def test_pending_connections_displace_strangers_first_and_never_a_complete_request() -> None:
    limits = AdmissionLimits(request_timeout=10, per_host=2, total=3, network_timeout=None,
                             peer_addresses=frozenset({"10.0.0.1"}))
    pending = PendingConnections(limits)
    pairs = [_pair() for _ in range(6)]
    try:
        peer = pending.admit(pairs[0][0], "10.0.0.1")
        complete = pending.admit(pairs[1][0], "10.0.0.2")
        pairs[1][1].sendall(struct.pack(">BBL", 0x01, 0, 4) + b"\x00" * 4)  # its A-ASSOCIATE-RQ is in
        stranger = pending.admit(pairs[2][0], "10.0.0.3")
        pending.admit(pairs[3][0], "10.0.0.4")  # total reached: the oldest waiting stranger goes
        assert stranger.evicted.is_set() and not peer.evicted.is_set() and not complete.evicted.is_set()
        assert pairs[2][1].recv(1) == b""  # and its socket is shut down at once
        first = pending.admit(pairs[4][0], "10.0.0.1")
        second = pending.admit(pairs[5][0], "10.0.0.1")  # per host reached: that host's oldest goes
        assert peer.evicted.is_set() and not first.evicted.is_set() and not second.evicted.is_set()
        assert pending.count("10.0.0.1") == 2
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_await_associate_rq_outcomes() -> None:
    a, b = _pair()
    with a, b:
        b.sendall(struct.pack(">BBL", 0x01, 0, 4) + b"\x00\x00")
        assert await_associate_rq(a, 0.3) is FirstPdu.TIMED_OUT
        b.sendall(b"\x00\x00")
        assert await_associate_rq(a, 5) is FirstPdu.ASSOCIATE_RQ
        assert len(a.recv(64)) == 10, "peeked, not consumed"
    a, b = _pair()
    with a, b:
        b.sendall(struct.pack(">BBL", 0x01, 0, 2**31))
        assert await_associate_rq(a, 5) is FirstPdu.TOO_LONG
    a, b = _pair()
    with a, b:
        b.close()
        assert await_associate_rq(a, 5) is FirstPdu.CLOSED


def test_await_associate_rq_takes_a_request_already_there_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole request in the receive buffer is seen in one look. (The first look used to ask for
    the 6-byte header only and then wait 50 ms for the rest: every association started late.)"""

    def no_wait(sock: socket.socket, wait: float) -> bool:
        raise AssertionError(f"waited {wait} s for a request that was all there")

    monkeypatch.setattr("dicom_node.listener._peer_half_closed", no_wait)
    a, b = _pair()
    with a, b:
        b.sendall(struct.pack(">BBL", 0x01, 0, 300) + b"\x00" * 300)
        assert await_associate_rq(a, 5) is FirstPdu.ASSOCIATE_RQ


def test_await_associate_rq_sees_the_peer_half_close_a_partial_pdu() -> None:
    a, b = _pair()
    with a, b:
        b.sendall(struct.pack(">BBL", 0x01, 0, 300) + b"\x00" * 20)
        b.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        assert await_associate_rq(a, 10) is FirstPdu.CLOSED
        assert time.monotonic() - started < 1.0
    a, b = _pair()
    with a, b:  # complete before the half-close: still a request
        b.sendall(struct.pack(">BBL", 0x01, 0, 4) + b"\x00" * 4)
        b.shutdown(socket.SHUT_WR)
        assert await_associate_rq(a, 5) is FirstPdu.ASSOCIATE_RQ


def test_check_associate_rq_refuses_what_pynetdicom_cannot_negotiate() -> None:
    verification = fz.Context(1, fz.VERIFICATION, (fz.IMPLICIT_VR_LE,))
    valid = _rq([verification, fz.Context(3, CT_IMAGE_STORAGE, (fz.EXPLICIT_VR_LE, fz.IMPLICIT_VR_LE))])
    assert check_associate_rq(valid) is None

    def refused(pdu: bytes) -> bytes | None:
        refusal = check_associate_rq(pdu)
        return None if refusal is None else refusal.answer

    assert refused(_empty_ts_rq()) == REJECT_NO_REASON
    assert refused(_rq([])) == REJECT_NO_REASON
    assert refused(_rq([verification, verification])) == REJECT_NO_REASON  # context ID 1 twice
    assert refused(_rq([fz.Context(1, "", (fz.IMPLICIT_VR_LE,))])) == REJECT_NO_REASON
    assert refused(valid[:6] + b"\x00\x00" + valid[8:]) == REJECT_PROTOCOL_VERSION
    application_context = 74 + 4 + len(fz.APPLICATION_CONTEXT)
    without_application_context = valid[6:74] + valid[application_context:]
    assert refused(fz.pdu(0x01, without_application_context)) == REJECT_APPLICATION_CONTEXT
    user_information = valid.rindex(b"\x50\x00")
    assert refused(fz.pdu(0x01, valid[6:user_information])) == REJECT_NO_REASON
    assert refused(valid[:26] + b" " * 16 + valid[42:]) == A_ABORT_INVALID_PDU  # blank calling AE title
    assert refused(valid[:-3]) == A_ABORT_INVALID_PDU  # shorter than its PDU length
