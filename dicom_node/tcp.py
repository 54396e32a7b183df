"""How our DICOM connections use TCP, installed by a pynetdicom event handler on both sides of an
association (:func:`low_latency_tcp`).

A DIMSE exchange is a ping-pong of small PDUs, the pattern in which TCP's two latency savers —
Nagle's algorithm on the sending side and delayed ACKs on the receiving side — wait for each
other: a peer that writes a PDU in two pieces holds the second until the first is acknowledged,
and the receiver holds the acknowledgement for up to 40 ms (Linux) hoping to piggyback it on
data. Both halves can be on our sockets, so we remove both. And a PDU is read in large pieces.
"""

from __future__ import annotations

import socket
from typing import Protocol

from pynetdicom.events import Event

#: Linux only; elsewhere a peer's Nagle delay, if any, stays.
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
#: Largest single read. pynetdicom reads 4 KiB at a time; a 7 MB radiograph then took ~1,800
#: reads (each a poll and a recv under the socket timeout): ~10 ms of CPU against ~3 ms this way.
READ_CHUNK = 256 * 1024


class _Transport(Protocol):
    socket: socket.socket | None


def quick_ack(sock: socket.socket) -> None:
    """Acknowledge what has been received now, and keep doing so for a while (tcp(7): Linux
    leaves quick-ACK mode again as soon as the traffic looks interactive, so this is re-armed
    after every read)."""
    if _TCP_QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:  # closed under us (or not TCP): the next read reports it
            pass


class PduReader:
    """Replaces ``AssociationSocket.recv(nr_bytes)`` of one connection: the same contract (a
    ``bytearray`` of *nr_bytes*, or fewer when the peer closed; socket errors propagate) with
    reads of up to :data:`READ_CHUNK` bytes, and a quick ACK after each.

    The result grows only as data arrives, never by the length a PDU header claims, so a PDU that
    announces 4 GiB costs no more memory than the bytes really sent (as with pynetdicom's own).

    Measured against DCMTK ``storescp`` with its default Nagle setting, a C-STORE of a small SR
    on an open association took 48 ms (its response waited for our delayed ACK), 3.8 ms with quick
    ACKs; with ``storescp`` run with ``TCP_NODELAY=1``, 3.7 ms.
    """

    __slots__ = ("_transport",)

    def __init__(self, transport: _Transport) -> None:
        self._transport = transport

    def __call__(self, nr_bytes: int) -> bytearray:
        sock = self._transport.socket
        if sock is None:
            raise OSError("the connection is closed")
        received = bytearray()
        with memoryview(bytearray(min(nr_bytes, READ_CHUNK))) as view:
            while len(received) < nr_bytes:
                count = sock.recv_into(view, min(nr_bytes - len(received), READ_CHUNK))
                if not count:  # the peer closed: what we have (pynetdicom reports the short PDU)
                    break
                received += view[:count]
                quick_ack(sock)
        return received


def low_latency_tcp(event: Event) -> None:
    """``EVT_CONN_OPEN``: no Nagle on our sends (TCP_NODELAY), and reads through a
    :class:`PduReader` (large reads, no delayed ACK of what we read).

    TCP_NODELAY: DIMSE writes a command and its data set as separate small PDUs; with Nagle's
    algorithm the second waited for the peer's delayed ACK. As an SCP that capped the rate of one
    association; as an SCU it added ~45 ms to every C-STORE of a report.

    Quick ACKs: the same wait, caused by the *peer's* Nagle (DCMTK's tools keep it unless run with
    ``TCP_NODELAY=1``): its C-STORE response, or the last PDU of a modality's data set, waited
    for our delayed ACK, ~40 ms per message.
    """
    transport = event.assoc.dul.socket
    sock = getattr(transport, "socket", None)
    if transport is None or sock is None or isinstance(transport.recv, PduReader):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return
    # An instance attribute shadows AssociationSocket.recv for this connection only: the DUL
    # reads every PDU through transport.recv (pynetdicom.dul.DULServiceProvider._read_pdu_data).
    transport.recv = PduReader(transport)  # type: ignore[method-assign]
