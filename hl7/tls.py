"""MLLP over TLS: the handshake on both sides, and what a failed one means.

HL7 v2 has no security of its own; MLLP Release 2 leaves confidentiality and peer
authentication to the transport, and IHE ITI TF-2 3.19 (ATNA "Authenticate Node") names TLS with
mutual certificate authentication for it, in the BCP 195 profile (RFC 9325) that DICOM PS3.15 B.9
uses too (:mod:`conf.tls` builds the contexts).

Listener (``[hl7.tls]`` with a certificate): the port speaks TLS only. A connection is accepted as
plain TCP and the handshake runs in the connection's own thread under one deadline
(:func:`wrap_server`, :func:`server_handshake`), never in the accept loop: a peer that connects and stays silent (a
half-open handshake) holds one connection slot until the deadline, and stops nobody else from
being accepted. A connection that fails the handshake gets no HL7 processing at all, not even an
ACK (there is no channel to carry one). :func:`classify` tells a failed *node authentication* (no
client certificate when one is required, or one our CA did not sign: a Security Alert, PS3.15
A.5.3.11 / DCM 110126) from transport noise (a plain MLLP sender, an old TLS version, a scanner),
which is only logged.

Sender (``hl7.destinations[].tls``): :func:`client_handshake` wraps the connection with
:func:`conf.tls.client_context` and checks the receiver's certificate, host name included.
"""

from __future__ import annotations

import socket
import ssl
import time

from conf.tls import HandshakeError, HandshakeFailure
from conf.tls import classify_handshake_failure as classify

__all__ = ["HandshakeError", "HandshakeFailure", "classify", "client_handshake", "describe_client_failure",
           "server_handshake", "wrap_server"]


def wrap_server(sock: socket.socket, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket | HandshakeError:
    """*sock* (accepted, plain) as a server-side TLS socket whose handshake has not run yet, with
    *timeout* as the deadline of that handshake; or why it cannot be wrapped (*sock* is then the
    caller's to close). The plain socket object is detached: the connection is the TLS socket's now."""
    try:
        sock.settimeout(timeout)
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:
        return classify(exc)


def server_handshake(tls: ssl.SSLSocket) -> HandshakeError | None:
    """Complete the server side of *tls*'s handshake (from :func:`wrap_server`); None when done.

    CPython's ``do_handshake`` takes the socket's timeout as one deadline for the whole
    handshake, so a peer trickling its handshake records cannot outlast it. Shutting the socket
    down from another thread (the server stopping) ends it at once."""
    try:
        tls.do_handshake()
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: shut down under us
        return classify(exc)
    return None


def client_handshake(sock: socket.socket, context: ssl.SSLContext, server_hostname: str, deadline: float) -> ssl.SSLSocket:
    """Wrap *sock* (connected) and complete the client side of the handshake by *deadline*
    (``time.monotonic``). Raises :class:`ssl.SSLError` (a certificate that does not verify:
    :class:`ssl.SSLCertVerificationError`), ``TimeoutError`` or ``OSError``; *sock* is then the
    caller's to close.

    *server_hostname* goes into SNI and, when the context checks host names (the default of
    :func:`conf.tls.client_context`), must be a name (or IP address) the certificate carries."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("TLS handshake: no time left")
    sock.settimeout(left)
    tls = context.wrap_socket(sock, server_side=False, server_hostname=server_hostname, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except BaseException:
        _close_quietly(tls)  # the plain socket was detached into it: this closes the connection
        raise
    return tls


def describe_client_failure(exc: BaseException) -> str:
    """A PHI-free reason for a failed outgoing handshake (for the delivery's error text)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"server certificate rejected ({exc.verify_message or exc.reason})"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc.__class__.__name__})"
    return f"TLS handshake failed ({exc.__class__.__name__})"


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
