"""The listening socket's defences: what happens to a TCP connection before it is an association,
and what is left behind when an association ends.

pynetdicom starts an association thread for every accepted connection and counts those threads
against ``maximum_associations``. A connection that never completes its A-ASSOCIATE-RQ (half-open,
or a bare connect) would then hold a slot while the thread waits: 100 of them lock every real peer
out with "Local Limit Exceeded". So before pynetdicom sees a connection, :class:`GuardedAssociationServer`

* runs the ARTIM timer of PS3.8 9.1.5 / 9.2 itself (state Sta2: transport connected, awaiting the
  A-ASSOCIATE-RQ PDU; expiry closes the transport connection, action AA-2): the connection gets
  ``association_request_timeout`` seconds to deliver a complete first PDU, read with ``MSG_PEEK``
  so pynetdicom still reads it normally; a connection closed by its peer is dropped at once;
* answers any first PDU other than an A-ASSOCIATE-RQ with an A-ABORT and closes (Sta2 actions
  AA-1 / AA-2), without starting an association;
* drops a connection at once when its peer half-closes (FIN, ``POLLRDHUP``) before the first PDU
  is complete: the PDU can never be completed, so waiting for the ARTIM timer would be pointless;
* decodes the complete A-ASSOCIATE-RQ with pynetdicom's own PDU class and checks what pynetdicom's
  negotiation takes for granted (:func:`check_associate_rq`): a request that fails is answered
  with an A-ASSOCIATE-RJ (PS3.8 9.3.4) or an A-ABORT (PS3.8 9.3.8) and closed at once, so it never
  becomes an association (and never holds a ``maximum_associations`` slot);
* bounds the connections that are still in that state, per remote address and in total; a new
  connection beyond a bound closes the *oldest* pending one (of that address, or of an address
  no configured peer uses), never the new one. A real peer sends its A-ASSOCIATE-RQ within
  milliseconds of connecting, so it always gets through, even from the address an attacker uses.

Only connections with a complete A-ASSOCIATE-RQ become pynetdicom associations, so pending ones
never count against ``maximum_associations``.

With ``[dicom.tls]`` the same defences hold on the TLS-only port (:mod:`dicom_node.tls`): the
connection is accepted without a handshake, and in its own thread, still a pending connection
(bounded and evictable like any other), it must complete the TLS handshake *and* deliver its
A-ASSOCIATE-RQ within the one ARTIM deadline. ``MSG_PEEK`` sees only ciphertext, so the first PDU
is read (:func:`read_first_pdu_tls`), checked with :func:`check_associate_rq` as on a plain
connection, and replayed to pynetdicom (:class:`dicom_node.tls.ReplaySSLSocket`). A failed
handshake is closed without a PDU and logged (throttled, with address and reason); a failed node
authentication (client certificate missing or not ours) is also reported to *on_tls_auth_failure*,
which audits it as a Security Alert.

When an association ends (released, aborted, or the connection dropped mid-dataset), the
temporary files pynetdicom wrote for its C-STORE data sets (``STORE_RECV_CHUNKED_DATASET``) and did
not hand to the Storage SCP are removed, and the DUL reactor and the connection are closed even
when the association thread died of an exception (:class:`CleaningRequestHandler`). An acceptor's
ARTIM timer in state Sta13 (awaiting transport close, after it sent an A-ASSOCIATE-RJ, an A-ABORT
or an A-RELEASE-RP) runs :data:`TRANSPORT_CLOSE_TIMEOUT` seconds, not the ACSE timeout: a peer that
never closes its end cannot keep the association alive for long.

Every association that reached pynetdicom ends with one INFO line, ``dicom.association``
(:class:`AssociationLog`): calling and called AE titles, the peer's address, accepted or rejected,
how it ended (released, aborted, closed) and how many instances were stored or refused — what a
PACS engineer looks for first. AE titles and addresses only, never PHI. An *accepted* association
is then handed, the same facts as a :class:`storage.associations.EndedAssociation`, to the server's
``on_association_end`` (the DICOM node records it in the database, for the metrics of every
acceptor process); that happens after the connection is closed, best effort: a failure is one
warning, ``dicom.association.not_recorded``. Rejected associations are only logged (and audited
by the node): a flood of them must not become database writes.
"""

from __future__ import annotations

import datetime as dt
import enum
import select
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import MaximumLengthNotification
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from conf.network import normalise_address
from dicom_node.tcp import quick_ack
from dicom_node.tls import HandshakeError, HandshakeFailure, ReplaySSLSocket, server_handshake
from storage.associations import EndedAssociation
from storage.models import DicomAssociationEnd

log = structlog.get_logger(__name__)

#: PS3.8 9.3.1: PDU type (1 byte), reserved (1), PDU length (4, big endian).
PDU_HEADER_LENGTH = 6
A_ASSOCIATE_RQ_TYPE = 0x01
#: The first PDU must be in the receive buffer up to this many bytes before pynetdicom reads it, and
#: an A-ASSOCIATE-RQ up to this long is validated whole (:func:`check_associate_rq`) first. It
#: cannot be much more: ``MSG_PEEK`` only sees what the receive buffer holds, and the kernel does
#: not open the TCP window further until data is consumed (Linux: about 128 KiB by default). A
#: longer A-ASSOCIATE-RQ (rare: 128 contexts with many transfer syntaxes) is read by pynetdicom
#: under the socket's network timeout, unvalidated; :class:`CleaningRequestHandler` still closes
#: its connection when pynetdicom fails on it.
PEEK_LIMIT = 64 * 1024
#: No A-ASSOCIATE-RQ is this long (128 presentation contexts with a dozen transfer syntaxes each
#: are under 100 KiB); a longer one is an attack on memory, since pynetdicom reads a PDU whole.
MAX_ASSOCIATE_RQ_LENGTH = 1024 * 1024
#: A-ABORT PDU (PS3.8 9.3.8), service-user source, reason not significant: Sta2 action AA-1.
A_ABORT_PDU = bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00])
#: A-ABORT PDU (PS3.8 9.3.8, Table 9-26), service-provider source (2), "invalid-PDU-parameter
#: value" (6): an A-ASSOCIATE-RQ that cannot be decoded.
A_ABORT_INVALID_PDU = bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x02, 0x06])
#: A-ABORT PDU, service-provider source (2), "reason-not-specified" (0): pynetdicom failed on an
#: association and left its connection open (AA-8).
A_ABORT_PROVIDER_PDU = bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x02, 0x00])
#: Seconds an acceptor association waits in Sta13 (awaiting transport close) for its peer to close,
#: the ARTIM timer of PS3.8 9.1.5 after AE-8, AA-1 or AR-4 (capped by the ACSE timeout).
TRANSPORT_CLOSE_TIMEOUT = 2.0
_POLL_SECONDS = 0.05
#: The first wait for the rest of an incomplete A-ASSOCIATE-RQ (doubling up to _POLL_SECONDS).
_FIRST_LOOK_SECONDS = 0.001
#: poll(2) events that mean no more data will come: peer FIN (Linux POLLRDHUP), hang-up, error.
_HANGUP_EVENTS = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
_LOG_INTERVAL_SECONDS = 10.0


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4, Table 9-21): type 3, length 4, reserved, *result*
    (1 rejected-permanent, 2 rejected-transient), *source* and *reason*/diag."""
    return struct.pack(">BBLBBBB", 0x03, 0x00, 4, 0x00, result, source, reason)


#: PS3.8 Table 9-21: rejected-permanent; source 2 = service-provider (ACSE related function) with
#: reasons 1 "no-reason-given" and 2 "application-context-name-not-supported"; source 3 =
#: service-provider (presentation related function) with reason 2 "protocol-version-not-supported".
REJECT_NO_REASON = a_associate_rj(0x01, 0x02, 0x01)
REJECT_APPLICATION_CONTEXT = a_associate_rj(0x01, 0x02, 0x02)
REJECT_PROTOCOL_VERSION = a_associate_rj(0x01, 0x03, 0x02)


@dataclass(frozen=True)
class Refusal:
    """Why an A-ASSOCIATE-RQ is refused by the listener, and the PDU that answers it."""

    reason: str
    answer: bytes


def check_associate_rq(pdu: bytes) -> Refusal | None:
    """Decode a complete A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) with pynetdicom's own decoder and check
    what pynetdicom's acceptor negotiation assumes without checking; None when it may proceed.

    * the PDU decodes, including its AE titles and every item (else A-ABORT, PS3.8 9.3.8:
      service-provider, "invalid-PDU-parameter value");
    * the protocol version has bit 0 set (PS3.8 9.3.2; else A-ASSOCIATE-RJ "protocol-version-not-
      supported");
    * an Application Context Item is present (PS3.8 9.3.2.1; else "application-context-name-not-
      supported");
    * at least one Presentation Context Item, each with an odd context ID 1-255 unique in the PDU,
      an Abstract Syntax Sub-Item and at least one Transfer Syntax Sub-Item (PS3.8 9.3.2.2), and a
      User Information Item with a Maximum Length Sub-Item (PS3.8 9.3.2.3, PS3.8 D.1); else
      A-ASSOCIATE-RJ rejected-permanent, service-provider (ACSE), "no-reason-given".

    Whether the calling AE may associate, and which contexts are accepted, is decided later by
    pynetdicom and :class:`dicom_node.server.DicomNode` (and audited there).
    """
    try:
        decoded = A_ASSOCIATE_RQ()
        decoded.decode(pdu)
        primitive = decoded.to_primitive()
    except Exception as exc:  # noqa: BLE001 - pynetdicom's decoders raise anything on bad input
        return Refusal(f"undecodable ({exc.__class__.__name__})", A_ABORT_INVALID_PDU)
    version = int(getattr(decoded, "protocol_version", 0) or 0)
    if not version & 0x0001:
        return Refusal(f"protocol version 0x{version:04X}", REJECT_PROTOCOL_VERSION)
    if not primitive.application_context_name:
        return Refusal("no application context", REJECT_APPLICATION_CONTEXT)
    contexts = primitive.presentation_context_definition_list
    if not contexts:
        return Refusal("no presentation context", REJECT_NO_REASON)
    seen: set[int] = set()
    for context in contexts:
        context_id = context.context_id
        if context_id is None or not 1 <= context_id <= 255 or context_id % 2 == 0 or context_id in seen:
            return Refusal(f"presentation context ID {context_id} invalid or repeated", REJECT_NO_REASON)
        seen.add(context_id)
        if not context.abstract_syntax:
            return Refusal(f"presentation context {context_id} without abstract syntax", REJECT_NO_REASON)
        if not context.transfer_syntax or not all(context.transfer_syntax):
            return Refusal(f"presentation context {context_id} without transfer syntax", REJECT_NO_REASON)
    user_information = primitive.user_information
    if not user_information or not any(isinstance(item, MaximumLengthNotification) for item in user_information):
        return Refusal("no maximum length in user information", REJECT_NO_REASON)
    return None


class FirstPdu(enum.Enum):
    """How a new connection's first PDU turned out (PS3.8 state Sta2)."""

    ASSOCIATE_RQ = "associate-rq"
    CLOSED = "closed"
    TIMED_OUT = "timed-out"
    NOT_ASSOCIATE_RQ = "not-associate-rq"
    TOO_LONG = "too-long"


def await_associate_rq(sock: socket.socket, timeout: float, cancelled: threading.Event | None = None) -> FirstPdu:
    """Wait up to *timeout* seconds until *sock* holds a complete A-ASSOCIATE-RQ PDU (or the
    first :data:`PEEK_LIMIT` bytes of one), without consuming it. *cancelled* (set when the
    connection is evicted) ends the wait as :attr:`FirstPdu.CLOSED`, and so does the peer's
    half-close (FIN) while the PDU is still incomplete: ``MSG_PEEK`` would go on returning the
    buffered bytes, so the FIN is seen with ``POLLRDHUP`` (PS3.8 Sta2: the transport connection
    closed before an A-ASSOCIATE-RQ arrived, AA-5).

    Each look asks for everything up to the PDU's end (the whole of a normal request arrives in
    one look); while it is incomplete, the next look comes after 1 ms, doubling up to
    :data:`_POLL_SECONDS` while nothing new arrives. (Each look used to ask for the 6-byte header
    first and then wait 50 ms before asking for the rest: every association started 50 ms late.)
    What arrived is acknowledged at once (``TCP_QUICKACK``): a peer with Nagle's algorithm on
    holds the second part of a request written in two pieces until then."""
    cancelled = cancelled or threading.Event()
    deadline = time.monotonic() + timeout
    wanted = PEEK_LIMIT
    seen = 0
    wait = _FIRST_LOOK_SECONDS
    peer_closed = False
    while True:
        remaining = deadline - time.monotonic()
        if cancelled.is_set():
            return FirstPdu.CLOSED
        if remaining <= 0:
            return FirstPdu.TIMED_OUT
        try:
            sock.settimeout(remaining)
            data = sock.recv(wanted, socket.MSG_PEEK)
        except TimeoutError:
            return FirstPdu.TIMED_OUT
        except OSError:
            return FirstPdu.CLOSED
        if not data:
            return FirstPdu.CLOSED
        quick_ack(sock)
        if len(data) >= PDU_HEADER_LENGTH:
            pdu_type, _, length = struct.unpack(">BBL", data[:PDU_HEADER_LENGTH])
            if pdu_type != A_ASSOCIATE_RQ_TYPE:
                return FirstPdu.NOT_ASSOCIATE_RQ
            if length > MAX_ASSOCIATE_RQ_LENGTH:
                return FirstPdu.TOO_LONG
            wanted = min(PDU_HEADER_LENGTH + length, PEEK_LIMIT)
            if len(data) >= wanted:
                return FirstPdu.ASSOCIATE_RQ
        if peer_closed:  # looked once more after the FIN: the PDU stays incomplete
            return FirstPdu.CLOSED
        # Part of the PDU is here: recv(MSG_PEEK) would return at once again, so wait a little
        # (less when more has just arrived), or until the peer half-closes.
        wait = _FIRST_LOOK_SECONDS if len(data) > seen else min(wait * 2, _POLL_SECONDS)
        seen = len(data)
        peer_closed = _peer_half_closed(sock, min(wait, max(0.0, deadline - time.monotonic())))


def _peer_half_closed(sock: socket.socket, wait: float) -> bool:
    """Whether the peer has shut down its sending side (or the connection failed), waiting up
    to *wait* seconds for it; data still unread in the receive buffer does not hide it."""
    poller = select.poll()
    try:
        poller.register(sock, _HANGUP_EVENTS)
        return any(events & _HANGUP_EVENTS for _, events in poller.poll(int(wait * 1000)))
    except (OSError, ValueError):
        return True


def read_first_pdu_tls(
    sock: ssl.SSLSocket, deadline: float, cancelled: threading.Event
) -> tuple[FirstPdu, bytes]:
    """Read a TLS connection's first PDU by *deadline* (``time.monotonic``): the outcome, as
    :func:`await_associate_rq` reports it, and the bytes read (to be replayed to pynetdicom).

    Reads up to the PDU's end, or :data:`PEEK_LIMIT` bytes of a longer one (the rest is left for
    pynetdicom, as on a plain connection), so a pending TLS connection holds at most that much
    memory. Unlike ``MSG_PEEK`` a read sees the peer's half-close at once (it returns nothing)."""
    data = bytearray()
    wanted = PEEK_LIMIT
    while len(data) < wanted:
        remaining = deadline - time.monotonic()
        if cancelled.is_set():
            return FirstPdu.CLOSED, bytes(data)
        if remaining <= 0:
            return FirstPdu.TIMED_OUT, bytes(data)
        try:
            sock.settimeout(remaining)
            chunk = sock.recv(wanted - len(data))
        except TimeoutError:
            return FirstPdu.TIMED_OUT, bytes(data)
        except (OSError, ValueError, AttributeError):  # TLS alert, reset, closed (evicted) under us
            return FirstPdu.CLOSED, bytes(data)
        if not chunk:
            return FirstPdu.CLOSED, bytes(data)
        quick_ack(sock)
        data += chunk
        if len(data) >= PDU_HEADER_LENGTH:
            pdu_type, _, length = struct.unpack(">BBL", data[:PDU_HEADER_LENGTH])
            if pdu_type != A_ASSOCIATE_RQ_TYPE:
                return FirstPdu.NOT_ASSOCIATE_RQ, bytes(data)
            if length > MAX_ASSOCIATE_RQ_LENGTH:
                return FirstPdu.TOO_LONG, bytes(data)
            wanted = min(PDU_HEADER_LENGTH + length, PEEK_LIMIT)
    return FirstPdu.ASSOCIATE_RQ, bytes(data)


def complete_pdu(data: bytes) -> bytes | None:
    """The first PDU of *data* when all of it is there (and no longer than :data:`PEEK_LIMIT`)."""
    if len(data) < PDU_HEADER_LENGTH:
        return None
    wanted = PDU_HEADER_LENGTH + int(struct.unpack(">L", data[2:6])[0])
    return data[:wanted] if wanted <= PEEK_LIMIT and len(data) >= wanted else None


@dataclass(frozen=True)
class AdmissionLimits:
    """``dicom.association_request_timeout``, ``max_pending_per_host``, ``max_pending_connections``."""

    request_timeout: float
    per_host: int
    total: int
    #: Applied to a connection once it has sent its A-ASSOCIATE-RQ (pynetdicom reads blocking).
    network_timeout: float | None
    #: Addresses of configured peers: their pending connections are evicted last.
    peer_addresses: frozenset[str] = frozenset()


@dataclass(eq=False)
class PendingConnection:
    sock: socket.socket
    host: str
    evicted: threading.Event = field(default_factory=threading.Event)


@dataclass
class PendingConnections:
    """Connections that have not yet delivered a complete A-ASSOCIATE-RQ, oldest first."""

    limits: AdmissionLimits
    _pending: OrderedDict[int, PendingConnection] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, sock: socket.socket, host: str) -> PendingConnection:
        """Register a new connection, first closing the oldest pending ones it displaces."""
        entry = PendingConnection(sock, normalise_address(host))
        with self._lock:
            victims = self._make_room(entry.host)
            self._pending[id(entry)] = entry
        for victim in victims:
            victim.evicted.set()
            _close_quietly(victim.sock, shutdown_only=True)  # wakes a blocked recv; its thread closes it
        return entry

    def release(self, entry: PendingConnection) -> None:
        with self._lock:
            self._pending.pop(id(entry), None)

    def evict_all(self) -> None:
        """Close every pending connection (the server is stopping: none may become an association)."""
        with self._lock:
            victims = [self._evict(entry) for entry in list(self._pending.values())]
        for victim in victims:
            victim.evicted.set()
            _close_quietly(victim.sock, shutdown_only=True)

    def count(self, host: str | None = None) -> int:
        with self._lock:
            return sum(1 for e in self._pending.values() if host is None or e.host == normalise_address(host))

    def _make_room(self, host: str) -> list[PendingConnection]:
        """Evict the oldest pending connections still short of a complete A-ASSOCIATE-RQ.

        One whose request is already in its receive buffer (its thread has not looked yet, on a
        busy machine) is about to leave the pending state by itself and is never evicted; when
        every candidate is such a one, the new connection is admitted over the limit.
        """
        victims: list[PendingConnection] = []
        waiting = [e for e in self._pending.values() if not has_complete_pdu(e.sock)]
        same_host = [e for e in waiting if e.host == host]
        while same_host and len(same_host) + self._complete_count(host, waiting) >= self.limits.per_host:
            victim = same_host.pop(0)
            waiting.remove(victim)
            victims.append(self._evict(victim))
        while waiting and len(self._pending) >= self.limits.total:
            strangers = [e for e in waiting if e.host not in self.limits.peer_addresses]
            victim = (strangers or waiting)[0]
            waiting.remove(victim)
            victims.append(self._evict(victim))
        return victims

    def _complete_count(self, host: str, waiting: list[PendingConnection]) -> int:
        return sum(1 for e in self._pending.values() if e.host == host and e not in waiting)

    def _evict(self, entry: PendingConnection) -> PendingConnection:
        del self._pending[id(entry)]
        return entry


def peek_first_pdu(sock: socket.socket) -> bytes | None:
    """The complete first PDU in *sock*'s receive buffer, without consuming it; None when it is
    longer than :data:`PEEK_LIMIT` (or not all there), so it cannot be checked before pynetdicom
    reads it."""
    try:
        header = sock.recv(PDU_HEADER_LENGTH, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(header) < PDU_HEADER_LENGTH:
            return None
        wanted = PDU_HEADER_LENGTH + int(struct.unpack(">L", header[2:6])[0])
        if wanted > PEEK_LIMIT:
            return None
        data = sock.recv(wanted, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    return data if len(data) == wanted else None


def has_complete_pdu(sock: socket.socket) -> bool:
    """Whether *sock*'s receive buffer already holds a complete first PDU (never blocks). Never
    for a TLS connection: its buffer holds ciphertext; it stays evictable until its own thread
    has read the PDU (:func:`read_first_pdu_tls`)."""
    if isinstance(sock, ssl.SSLSocket):
        return False
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        header = sock.recv(PDU_HEADER_LENGTH, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(header) < PDU_HEADER_LENGTH:
            return False
        wanted = min(PDU_HEADER_LENGTH + int(struct.unpack(">L", header[2:6])[0]), PEEK_LIMIT)
        return len(sock.recv(wanted, socket.MSG_PEEK | socket.MSG_DONTWAIT)) >= wanted
    except (OSError, ValueError):
        return False


class _Throttled:
    """At most one warning per reason every few seconds: a flood must not flood the log too."""

    def __init__(self, interval: float = _LOG_INTERVAL_SECONDS) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, reason: str, host: str, detail: str | None = None, *, event: str = "dicom.connection.dropped") -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(reason, -self._interval) < self._interval:
                self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
                return
            self._last[reason] = now
            suppressed = self._suppressed.pop(reason, 0)
        extra = {} if detail is None else {"detail": detail}
        log.warning(event, reason=reason, address=host, similar_since_last=suppressed, **extra)


class TempFiles:
    """The chunked C-STORE data set files pynetdicom creates for one association."""

    def __init__(self) -> None:
        self._seen: list[Any] = []

    def on_dimse_recv(self, event: Event) -> None:
        """EVT_DIMSE_RECV: a complete message; a C-STORE-RQ's file is handed to the SCP next."""
        if getattr(event.message, "_data_set_file", None) is not None:
            self._seen.append(event.message._data_set_file)

    def remove_left_over(self, assoc: Any) -> int:
        """After the association thread ended: remove every file no handler consumed.

        pynetdicom deletes a data set file after the C-STORE handler returns. What is left is the
        message that was arriving when the association ended (``dimse.message``) and messages
        received but never handled. Files are matched by the path pynetdicom created, so a file
        the Storage SCP moved elsewhere is never touched.
        """
        handles = list(self._seen)
        partial = getattr(getattr(assoc, "dimse", None), "message", None)
        if getattr(partial, "_data_set_file", None) is not None:
            handles.append(partial._data_set_file)  # type: ignore[union-attr]
        removed = 0
        for handle in {id(h): h for h in handles}.values():
            removed += _remove_temp_file(handle)
        if removed:
            log.info("dicom.store.partial_removed", files=removed)
        return removed


#: PS3.4 B.2.3 / PS3.7 C.4: the C-STORE statuses that mean the instance was stored (Success,
#: and the Warnings "coercion of data elements", "elements discarded", "data set does not match").
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def association_end(*, accepted: bool, rejected: bool, released: bool, aborted: bool) -> str:
    """How an association ended, in an operator's words (pure): ``rejected`` (A-ASSOCIATE-RJ),
    ``released`` (A-RELEASE), ``aborted`` (A-ABORT, or the connection lost: A-P-ABORT),
    ``closed`` (accepted, then the connection ended without either) or ``no-request`` (the
    A-ASSOCIATE-RQ never reached negotiation)."""
    if rejected:
        return "rejected"
    if released:
        return "released"
    if aborted:
        return "aborted"
    return "closed" if accepted else "no-request"


#: Called with each accepted association once it has ended (from its connection's thread).
AssociationEndHandler = Callable[[EndedAssociation], object]
#: The ends of an accepted association (``rejected`` and ``no-request`` are not recorded).
_RECORDED_ENDS = frozenset(end.value for end in DicomAssociationEnd)


class AssociationLog:
    """Collects what one association did from pynetdicom's notification events and logs it as
    one INFO line when the association is over (:meth:`emit`, from the connection's thread).

    Instances are counted from the C-STORE responses we send (EVT_DIMSE_SENT), so every path of
    the Storage SCP counts, refusals included, without the SCP knowing about this log.
    """

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.accepted = False
        self.stored = 0
        self.refused = 0
        self._started = time.monotonic()
        self._started_at = dt.datetime.now(dt.UTC)

    def bind(self, assoc: Any) -> None:
        assoc.bind(evt.EVT_ACCEPTED, self._on_accepted)
        assoc.bind(evt.EVT_DIMSE_SENT, self._on_dimse_sent)

    def _on_accepted(self, _event: Event) -> None:
        self.accepted = True

    def _on_dimse_sent(self, event: Event) -> None:
        message = event.message
        if isinstance(message, C_STORE_RSP):
            status = int(getattr(message.command_set, "Status", -1))
            if status in STORED_STATUSES:
                self.stored += 1
            else:
                self.refused += 1

    def emit(self, assoc: Any, *, tls: bool = False) -> EndedAssociation | None:
        """The association's one line; called once, after its thread ended (however it ended).
        Returns the record of an accepted association (None for a rejected or never negotiated
        one); its end time is the start plus the monotonic duration the line reports."""
        primitive = getattr(getattr(assoc, "requestor", None), "primitive", None)
        end = association_end(
            accepted=self.accepted, rejected=bool(assoc.is_rejected), released=bool(assoc.is_released),
            aborted=bool(assoc.is_aborted),
        )
        calling = str(primitive.calling_ae_title).strip() if primitive is not None else None
        called = str(primitive.called_ae_title).strip() if primitive is not None else None
        seconds = max(0.0, time.monotonic() - self._started)
        log.info(
            "dicom.association",
            assoc_id=id(assoc) & 0xFFFFFF,
            calling_ae=calling,
            called_ae=called,
            address=self.address,
            port=self.port,
            result="accepted" if self.accepted else "rejected" if end == "rejected" else "not-negotiated",
            end=end,
            instances_stored=self.stored,
            instances_refused=self.refused,
            duration_s=round(seconds, 3),
        )
        if not self.accepted or end not in _RECORDED_ENDS:
            return None
        return EndedAssociation(
            calling_ae=calling or "", called_ae=called or "", peer_address=self.address,
            ended_by=DicomAssociationEnd(end), started_at=self._started_at,
            ended_at=self._started_at + dt.timedelta(seconds=seconds), instances_stored=self.stored,
            instances_refused=self.refused, tls=tls,
        )


def _remove_temp_file(handle: Any) -> int:
    try:
        handle.close()
    except (OSError, ValueError):
        pass
    try:
        Path(handle.name).unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.error("dicom.store.partial_remove_failed", error=exc.__class__.__name__)
        return 0
    return 1


class CleaningRequestHandler(RequestHandler):
    """pynetdicom's handler, plus: a short ARTIM timer for Sta13, then wait for the association
    to end, however it ends, and close what it left open. Runs in the connection's own thread,
    so waiting costs nothing else."""

    def handle(self) -> None:
        assoc = self._create_association()
        # pynetdicom runs the ARTIM timer (PS3.8 9.1.5) with the ACSE timeout. It is only ever
        # started in Sta2 (AE-5: the A-ASSOCIATE-RQ is already in the receive buffer, the
        # listener saw to that) and on entering Sta13 (AE-8, AA-1, AR-4): there a peer that
        # keeps its end open would hold a maximum_associations slot for the whole ACSE timeout.
        # The ACSE timeout itself (waiting for the A-ASSOCIATE-RQ / A-RELEASE-RP primitives) is
        # assoc.acse_timeout and stays as configured.
        acse_timeout = assoc.acse_timeout
        assoc.dul.artim_timer.timeout = (
            TRANSPORT_CLOSE_TIMEOUT if acse_timeout is None else min(acse_timeout, TRANSPORT_CLOSE_TIMEOUT)
        )
        temp_files = TempFiles()
        transport_closed = threading.Event()
        summary = AssociationLog(str(self.client_address[0]), int(self.client_address[1]))
        summary.bind(assoc)
        assoc.bind(evt.EVT_DIMSE_RECV, temp_files.on_dimse_recv)
        assoc.bind(evt.EVT_CONN_CLOSE, lambda _event: transport_closed.set())
        try:
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            self._join(assoc, transport_closed)
        finally:
            temp_files.remove_left_over(assoc)
            self._close_association(assoc)
            ended = summary.emit(assoc, tls=isinstance(self.request, ssl.SSLSocket))
            if ended is not None:
                self._record(assoc, ended)

    def _record(self, assoc: Any, ended: EndedAssociation) -> None:
        """Hand the ended association to the server's ``on_association_end``, best effort: the
        peer has its answers and the connection is closed; a failure here is one warning."""
        on_end: AssociationEndHandler | None = getattr(self.server, "on_association_end", None)
        if on_end is None:
            return
        try:
            on_end(ended)
        except Exception as exc:  # noqa: BLE001 - the association is over; its record is not worth more
            log.warning("dicom.association.not_recorded", assoc_id=id(assoc) & 0xFFFFFF, error=exc.__class__.__name__)

    @staticmethod
    def _join(assoc: Any, transport_closed: threading.Event) -> None:
        """Wait for the association thread, waking it when it waits for nothing.

        pynetdicom's acceptor thread first waits up to the ACSE timeout for the A-ASSOCIATE
        indication. When the DUL never delivers one (the request could not be decoded, PS3.8
        Evt19: A-ABORT, Sta13, then the transport closed by the peer or by ARTIM, AA-2 / AR-5),
        the thread would go on waiting, and counting against ``maximum_associations``, for the
        rest of the ACSE timeout. Once the transport is closed, no primitive can arrive any more:
        if none has (and none is queued, checked twice a poll apart so one being taken off the
        queue is not missed), the thread is woken exactly as if its wait had timed out.
        """
        dul = assoc.dul
        idle_polls = 0
        while assoc.is_alive():
            assoc.join(_POLL_SECONDS * 4)
            waiting_for_nothing = (
                transport_closed.is_set() and assoc.requestor.primitive is None and dul.to_user_queue.empty()
            )
            idle_polls = idle_polls + 1 if waiting_for_nothing else 0
            if idle_polls == 2:
                dul.to_user_queue.put(None)  # receive_pdu() returns None: "timed out", pynetdicom cleans up

    def _close_association(self, assoc: Any) -> None:
        """Stop the DUL reactor and close the connection once the association thread is gone.

        On every path where the association thread ends normally pynetdicom has closed the
        socket (released, aborted, rejected, timed out). When the thread died of an exception
        (pynetdicom failing on a request it should have refused), the socket is still open, the
        DUL thread may still be running and nobody would ever close the connection: the peer
        would wait forever. It then gets an A-ABORT (PS3.8 9.3.8, service-provider) and the
        connection is closed (AA-8); closing an already closed socket is harmless. A DUL still
        running after a normal end (Sta13 after a rejection, socket already closed) is stopped.
        """
        dul = assoc.dul
        crashed = self.request.fileno() != -1
        if dul.is_alive():
            dul.kill_dul()
            dul.join(timeout=5.0)
        if crashed:
            log.warning("dicom.association.thread_failed", address=str(self.client_address[0]))
            try:
                self.request.settimeout(1.0)
                self.request.sendall(A_ABORT_PROVIDER_PDU)
            except OSError:
                pass
        _close_quietly(self.request)


#: Called with the peer's address and what failed when a TLS peer fails node authentication.
TlsAuthFailureHandler = Callable[[str, str], None]


class GuardedAssociationServer(ThreadedAssociationServer):
    """A pynetdicom server that admits only connections with a complete A-ASSOCIATE-RQ.

    With *ssl_context* (:func:`dicom_node.tls.listener_context`) it speaks TLS only. pynetdicom's
    own ``get_request`` would run the TLS handshake inside the accept loop, where one silent peer
    stops every other connection from being accepted; here the handshake runs in the connection's
    thread under the ARTIM deadline (see the module docstring)."""

    daemon_threads = True

    def __init__(
        self,
        ae: Any,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: Any = None,
        evt_handlers: list[Any] | None = None,
        *,
        limits: AdmissionLimits,
        on_tls_auth_failure: TlsAuthFailureHandler | None = None,
        on_association_end: AssociationEndHandler | None = None,
    ) -> None:
        self.limits = limits
        #: Called with each accepted association once it has ended (:meth:`CleaningRequestHandler._record`).
        self.on_association_end = on_association_end
        self.pending = PendingConnections(limits)
        self._throttled = _Throttled()
        self._on_tls_auth_failure = on_tls_auth_failure
        if ssl_context is not None and not issubclass(ssl_context.sslsocket_class, ReplaySSLSocket):
            raise ValueError("the DICOM listener needs an SSL context from dicom_node.tls.listener_context()")
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler=CleaningRequestHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; on a TLS listener wrap it without a handshake (done later, in the
        connection's thread, under the ARTIM deadline)."""
        assert self.socket is not None  # bound by socketserver before serving
        sock, address = self.socket.accept()
        if self.ssl_context is not None:
            try:
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError):  # reset before it could be wrapped: nothing to serve
                _close_quietly(sock)
                raise OSError("connection lost before TLS") from None
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Called by the accept loop: book the connection (so eviction is exact), then wait for
        its A-ASSOCIATE-RQ in a thread of its own."""
        entry = self.pending.admit(request, str(client_address[0]))
        threading.Thread(
            target=self._serve_connection, args=(request, client_address, entry), name="DicomConnection", daemon=True
        ).start()

    def server_close(self) -> None:
        """Stop listening, and close the connections still waiting for their A-ASSOCIATE-RQ."""
        super().server_close()
        self.pending.evict_all()

    def _serve_connection(self, request: socket.socket, client_address: Any, entry: PendingConnection) -> None:
        if isinstance(request, ReplaySSLSocket):
            self._serve_tls_connection(request, client_address, entry)
            return
        try:
            outcome = await_associate_rq(request, self.limits.request_timeout, entry.evicted)
        finally:
            self.pending.release(entry)
        if outcome is not FirstPdu.ASSOCIATE_RQ or entry.evicted.is_set():
            self._drop(request, entry, outcome)
            return
        refusal = check_associate_rq(pdu) if (pdu := peek_first_pdu(request)) is not None else None
        if refusal is not None:
            self._refuse(request, entry, refusal)
            return
        request.settimeout(self.limits.network_timeout)
        self.process_request_thread(request, client_address)

    def _serve_tls_connection(self, request: ReplaySSLSocket, client_address: Any, entry: PendingConnection) -> None:
        """The TLS path of :meth:`_serve_connection`: handshake, then read and check the first
        PDU, all within one ARTIM deadline and while still a pending connection."""
        deadline = time.monotonic() + self.limits.request_timeout
        outcome, first = FirstPdu.CLOSED, b""
        try:
            failure = server_handshake(request, deadline)
            if failure is None:
                outcome, first = read_first_pdu_tls(request, deadline, entry.evicted)
        finally:
            self.pending.release(entry)
        if failure is not None and not entry.evicted.is_set():
            self._tls_failed(request, entry, failure)
            return
        if outcome is not FirstPdu.ASSOCIATE_RQ or entry.evicted.is_set():
            self._drop(request, entry, outcome)
            return
        refusal = check_associate_rq(pdu) if (pdu := complete_pdu(first)) is not None else None
        if refusal is not None:
            self._refuse(request, entry, refusal)
            return
        request.replay(first)
        request.settimeout(self.limits.network_timeout)
        self.process_request_thread(request, client_address)

    def _tls_failed(self, request: socket.socket, entry: PendingConnection, error: HandshakeError) -> None:
        """Close a connection whose TLS handshake failed, without a PDU (the peer cannot read one);
        a failed node authentication is reported for the audit trail, every one of them, before
        the connection is closed (OpenSSL has already sent its alert)."""
        failure = error.failure
        if failure is HandshakeFailure.CLOSED:
            log.debug("dicom.connection.closed_before_request", address=entry.host, tls=True)
        else:
            self._throttled.warn(failure.value, entry.host, error.detail, event="dicom.tls.handshake_failed")
        try:
            if failure.node_authentication and self._on_tls_auth_failure is not None:
                no_certificate = failure is HandshakeFailure.NO_CLIENT_CERTIFICATE
                what = "no client certificate" if no_certificate else "client certificate rejected"
                self._on_tls_auth_failure(entry.host, f"TLS node authentication failed: {what} ({error.detail})")
        finally:
            _close_quietly(request)

    def _refuse(self, request: socket.socket, entry: PendingConnection, refusal: Refusal) -> None:
        """Answer an invalid A-ASSOCIATE-RQ (A-ASSOCIATE-RJ or A-ABORT) and close at once: the
        connection never becomes an association (PS3.8 Sta2 -> Sta1; the rejection's Sta13 is
        skipped, the peer learns the reason from the PDU and then sees the close)."""
        try:
            request.settimeout(1.0)
            request.sendall(refusal.answer)
        except OSError:
            pass
        self._throttled.warn("invalid-associate-rq", entry.host, refusal.reason)
        _close_quietly(request)

    def _drop(self, request: socket.socket, entry: PendingConnection, outcome: FirstPdu) -> None:
        if outcome in (FirstPdu.NOT_ASSOCIATE_RQ, FirstPdu.TOO_LONG):
            try:
                request.settimeout(1.0)
                request.sendall(A_ABORT_PDU)
            except OSError:
                pass
        reason = "evicted" if entry.evicted.is_set() else outcome.value
        if reason == FirstPdu.CLOSED.value:
            log.debug("dicom.connection.closed_before_request", address=entry.host)
        else:
            self._throttled.warn(reason, entry.host)
        _close_quietly(request)


class ReusePortAssociationServer(GuardedAssociationServer):
    """A listening socket that other acceptor processes may bind too (Linux SO_REUSEPORT): the
    kernel spreads new associations over the processes, so they stop sharing one GIL."""

    def server_bind(self) -> None:
        assert self.socket is not None  # created by socketserver before binding
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _close_quietly(sock: socket.socket, *, shutdown_only: bool = False) -> None:
    """Shut the connection down (waking a thread blocked on it) and close it. The plain socket's
    ``shutdown`` also for a TLS socket: ``SSLSocket.shutdown`` would first drop its TLS state
    under a thread still in the handshake or a read."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
    if not shutdown_only:
        sock.close()
