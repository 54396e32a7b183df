"""DICOM over TLS: the "BCP 195 TLS Secure Transport Connection Profile" of PS3.15 B.9 (TLS 1.2
or 1.3, RFC 9325 cipher suites; the profile itself is :mod:`conf.tls`), on both sides of an
association.

Listener (``[dicom.tls]`` with a certificate): the port speaks TLS only. A connection is wrapped
without a handshake in the accept loop (:func:`listener_context`: the handshake of a silent peer
must never hold up ``accept``); the handshake runs in the connection's own thread under the
listener's ARTIM deadline (:func:`server_handshake`), and a connection that fails it is closed
without any DICOM answer: a peer that cannot complete TLS gets no PDU, not even an A-ABORT. A
failure that is the peer's *node authentication* failing (no client certificate when one is
required, or one our CA did not sign: PS3.15 B.9 / A.5.3.11 "Node Authentication") is told apart
from transport noise (a plain DICOM client, an old TLS version, a port scanner), because only
the first is a Security Alert for the audit trail.

The listener's first-PDU checks (ARTIM, A-ASSOCIATE-RQ validation, pending-connection bounds,
:mod:`dicom_node.listener`) look at a plain connection's first PDU with ``MSG_PEEK``, leaving it
for pynetdicom to read. Nothing can be peeked through TLS (the receive buffer holds ciphertext and
``SSLSocket.recv`` refuses flags), so on TLS the listener *reads* the first PDU, checks it, and
hands pynetdicom a :class:`ReplaySSLSocket` that returns those bytes again before anything else.

Outgoing (``dicom.destinations[].tls``, C-MOVE sub-associations when ``[dicom.tls]`` is on):
:func:`outgoing_context` is :func:`conf.tls.client_context` without the host-name check (DICOM
peers are configured by address; their certificate chain is still verified against ``ca_file``)
and with our certificate as client certificate.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from conf.tls import HandshakeError, HandshakeFailure, TlsSettings, client_context, peer_certificate_fingerprint, server_context
from conf.tls import classify_handshake_failure as classify

__all__ = ["HandshakeError", "HandshakeFailure", "ReplaySSLSocket", "classify", "listener_context",
           "outgoing_context", "presented_fingerprint", "server_handshake"]


class ReplaySSLSocket(ssl.SSLSocket):
    """An :class:`ssl.SSLSocket` that first returns bytes already read from it (:meth:`replay`),
    then what the connection delivers.

    ``recv``, ``recv_into`` and ``pending`` are the calls pynetdicom's transport makes (``pending``
    in ``AssociationSocket.ready``, where data buffered above the kernel counts as readable), and
    :class:`dicom_node.tcp.PduReader` uses ``recv_into``. Made by ``SSLContext.wrap_socket`` (its
    ``sslsocket_class``), which never calls ``__init__``: hence the class-level default.
    """

    _replayed: bytes = b""

    def replay(self, data: bytes) -> None:
        """Return *data* from the next reads, before anything still on the connection."""
        self._replayed = bytes(data) + self._replayed

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self._replayed:
            chunk, self._replayed = self._replayed[:buflen], self._replayed[buflen:]
            return chunk
        return super().recv(buflen, flags)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        if self._replayed:
            with memoryview(buffer) as view:
                count = min(len(self._replayed), nbytes or view.nbytes)
                view[:count] = self._replayed[:count]
            self._replayed = self._replayed[count:]
            return count
        return super().recv_into(buffer, nbytes, flags)

    def pending(self) -> int:
        return len(self._replayed) + super().pending()


def listener_context(tls: TlsSettings) -> ssl.SSLContext:
    """The DICOM listener's context (:func:`conf.tls.server_context`: BCP 195, client
    certificates verified against ``ca_file``) making :class:`ReplaySSLSocket` connections."""
    context = server_context(tls)
    context.sslsocket_class = ReplaySSLSocket
    return context


def outgoing_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context of our associations to TLS peers: their chain verified against ``ca_file``
    (the system trust store without one), no host-name check (peers are configured by IP
    address), our certificate presented as client certificate when ``[dicom.tls]`` has one."""
    return client_context(tls, check_hostname=False)


def server_handshake(sock: ssl.SSLSocket, deadline: float) -> HandshakeError | None:
    """Complete the server side of the TLS handshake of *sock* by *deadline* (``time.monotonic``);
    None when done. The socket's timeout is one deadline for the whole handshake (CPython's
    ``do_handshake``), so a peer trickling its handshake records cannot outlast it."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return classify(TimeoutError())
    try:
        sock.settimeout(remaining)
        sock.do_handshake()
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: closed (evicted) under us
        return classify(exc)
    return None


def presented_fingerprint(sock: socket.socket | None) -> str | None:
    """SHA-256 fingerprint of the client certificate the peer of *sock* presented; None on a
    plain connection or without a certificate."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        return peer_certificate_fingerprint(sock)
    except (OSError, ValueError, AttributeError):  # closed meanwhile
        return None
