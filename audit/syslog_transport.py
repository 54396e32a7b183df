"""RFC 5425 transport: one TLS connection to the Audit Record Repository, frames written in order.

Only TLS is offered: DICOM PS3.15 A.6 requires it for audit messages (they name patients), and
IHE ATNA's node authentication is mutual — the repository's certificate is verified against
``audit.syslog.tls.ca_file`` (and its host name, by default) and ours is presented from
``cert_file``/``key_file`` (:func:`conf.tls.client_context`: TLS 1.2+, BCP 195 ciphers). Plain
UDP (RFC 5426) and TCP are deliberately not implemented.

RFC 5425 has no application-level acknowledgement: the repository never writes to the
connection. A write that returned only means the frames reached our TCP send buffer, so
:meth:`SyslogTlsConnection.send` first checks that the repository has not closed the connection
in the meantime (a readable socket on a connection the peer never writes to means EOF,
close_notify or a reset), which turns an idle connection closed by a restarted repository into
a reconnect instead of frames written into a dead socket.
"""

from __future__ import annotations

import select
import socket
import ssl
from types import TracebackType

from conf.errors import UnavailableError


class SyslogConnectionError(UnavailableError, OSError):
    """The repository closed the connection (an :class:`OSError`, like every transport failure)."""


class SyslogTlsConnection:
    """A TLS client connection carrying octet-counted syslog frames (RFC 5425 §4.3)."""

    #: How long a TLS 1.3 connection waits after its handshake for the repository's verdict on
    #: our client certificate (see :meth:`_await_verdict`).
    VERDICT_SECONDS = 0.5

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext, *, timeout: float = 10.0, server_hostname: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.timeout = timeout
        self.server_hostname = server_hostname or host
        self._sock: ssl.SSLSocket | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """Open TCP, complete the TLS handshake (certificate checks included), or raise."""
        self.close()
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock = self.context.wrap_socket(raw, server_hostname=self.server_hostname)
        except BaseException:
            raw.close()
            raise
        try:
            self._await_verdict(sock)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        self._sock = sock

    def _await_verdict(self, sock: ssl.SSLSocket) -> None:
        """On TLS 1.3 our handshake ends before the repository has checked *our* certificate
        (RFC 8446 §4.4.2: the client's Certificate and Finished come last), so a refused client
        certificate only shows as an alert after "connected" — frames written then would be
        counted as sent and dropped. Wait briefly for that verdict: an alert or EOF raises, silence
        (or a session ticket, which the server sends once it accepted us) means accepted."""
        if sock.version() != "TLSv1.3":
            return  # TLS 1.2: the server's Finished came after it verified our certificate
        sock.settimeout(min(self.timeout, self.VERDICT_SECONDS))
        try:
            data = sock.recv(1)
        except TimeoutError:
            return
        except ssl.SSLWantReadError:
            return
        if not data:
            raise SyslogConnectionError("the repository closed the connection after the TLS handshake")
        raise SyslogConnectionError("the repository sent data (RFC 5425 receivers send none)")

    def peer_closed(self) -> bool:
        """True when the repository has closed (or reset) the connection: it never sends data
        (RFC 5425), so anything readable is EOF, a TLS close_notify or an alert."""
        sock = self._sock
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable and not sock.pending():
                return False
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            finally:
                sock.settimeout(self.timeout)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False  # only TLS bookkeeping (e.g. a TLS 1.3 session ticket) was readable
        except (OSError, ValueError):
            return True
        # b"" is EOF or close_notify; data from a repository that must send none (RFC 5425) is a
        # protocol breach: either way this connection is done.
        del data
        return True

    def send(self, payload: bytes) -> None:
        """Write *payload* (one or more frames) completely, or raise :class:`OSError`."""
        if self._sock is None:
            raise SyslogConnectionError("not connected")
        if self.peer_closed():
            self.close()
            raise SyslogConnectionError("the repository closed the connection")
        self._sock.sendall(payload)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.settimeout(1.0)
            sock.unwrap()  # send close_notify (RFC 5425 §4.4)
        except (OSError, ValueError):
            pass
        finally:
            sock.close()

    def __enter__(self) -> SyslogTlsConnection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
