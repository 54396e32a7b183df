"""TCP options of our DICOM connections, as a pynetdicom event handler.

A DIMSE exchange is a ping-pong of small PDUs, the pattern in which TCP's two latency savers —
Nagle's algorithm on the sending side and delayed ACKs on the receiving side — wait for each
other: a peer that writes a PDU in two pieces holds the second until the first is acknowledged,
and the receiver holds the acknowledgement for up to 40 ms (Linux) hoping to piggyback it on
data. Both sides of that deadlock can be ours, so we remove both from our sockets.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from pynetdicom.events import Event

#: Linux only; elsewhere the peer's Nagle delay, if any, stays.
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class QuickAckSocket:
    """A connected socket whose every read re-arms ``TCP_QUICKACK``, so that what we receive is
    acknowledged at once instead of after the delayed-ACK timer.

    Why a wrapper: Linux leaves quick-ACK mode again as soon as the traffic looks interactive,
    so the flag has to be set after each read (tcp(7)). Measured against DCMTK ``storescp`` with
    its default Nagle setting: a C-STORE of a small SR took 48 ms on an open association (its
    response waited for our delayed ACK), 3.8 ms with this wrapper; with ``storescp`` run with
    ``TCP_NODELAY=1``, 3.7 ms. Everything else is the wrapped socket's own (``fileno`` for
    ``select``, ``send``, ``shutdown``, ``close`` ...).
    """

    __slots__ = ("_socket",)

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock

    @property
    def wrapped(self) -> socket.socket:
        return self._socket

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = self._socket.recv(bufsize, flags)
        if data and _TCP_QUICKACK is not None:
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:  # closed under us: the next read reports it
                pass
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


def low_latency_tcp(event: Event) -> None:
    """``EVT_CONN_OPEN``: no Nagle on our sends (TCP_NODELAY) and no delayed ACK of what we read
    (:class:`QuickAckSocket`), on either side of an association.

    TCP_NODELAY: DIMSE writes a command and its data set as separate small PDUs; with Nagle's
    algorithm the second waited for the peer's delayed ACK. As an SCP that capped the rate of one
    association; as an SCU it added ~45 ms to every C-STORE of a report.

    Quick ACKs: the same wait, caused by the *peer's* Nagle (DCMTK's tools keep it unless run with
    ``TCP_NODELAY=1``): its C-STORE response, or the last PDU of a modality's data set, waited
    for our delayed ACK, ~40 ms per message. A TLS socket is left unwrapped (pynetdicom asks it for
    buffered plaintext by type).
    """
    transport = event.assoc.dul.socket
    sock = getattr(transport, "socket", None)
    if transport is None or sock is None or isinstance(sock, QuickAckSocket):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return
    if _TCP_QUICKACK is not None and not isinstance(sock, ssl.SSLSocket):
        # Typed as a socket by pynetdicom; it only calls socket methods on it (see the class).
        transport.socket = QuickAckSocket(sock)  # type: ignore[assignment]
