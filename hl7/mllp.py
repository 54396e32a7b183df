"""MLLP, the Minimal Lower Layer Protocol that carries HL7 v2 messages over TCP.

References: HL7 Version 3 Standard "Transport Specification: MLLP, Release 2" (the block format
and reliable-delivery rules, referenced by the HL7 v2.5.1 Implementation Guides) and HL7 v2.x
appendix C "Lower Layer Protocols" (C.4, MLLP Release 1). Both define the same block::

    <SB> dddd <EB><CR>        SB = VT = 0x0B, EB = FS = 0x1C, CR = 0x0D

``dddd`` is one HL7 v2 message in the character encoding its MSH-18 names (ASCII, ISO-8859-x,
UTF-8: every byte-oriented encoding MLLP allows); the spec forbids the bytes ``SB`` and ``EB``
inside it, which is what makes the block unambiguous without a length field. Bytes are treated
as bytes here: decoding characters is the HL7 parser's job, which knows MSH-18.

What this module adds to the bare spec, and why:

* **The first EB ends the message.** Since the content can never contain ``EB``, the block's
  content is known complete at the ``EB``: the frame is delivered there, and a ``CR`` right after
  it is consumed. An ``EB`` *not* followed by ``CR`` is tolerated (it is a sender bug seen in the
  field, and refusing the message would gain nothing: there is no other reading of the bytes);
  what follows is read as if the ``CR`` had been there: a ``SB`` starts the next block, anything
  else is junk. A sender that stops after the ``EB`` gets its reply without waiting for a byte
  that may never come.
* **Bytes outside a block** are not part of any message. ``CR`` and ``LF`` between blocks (some
  senders end a block with ``<EB><CR><LF>``) are skipped silently; any other byte starts a run of
  junk that is reported once (:data:`FrameError.JUNK`) and skipped up to the next ``SB``.
* **A ``SB`` inside a block** means the sender gave up on the block and started another: the
  unfinished one is reported (:data:`FrameError.TRUNCATED`), and the new one is read.
* **A block larger than the limit** is reported (:data:`FrameError.TOO_LARGE`) as soon as the
  limit is passed, not at its ``EB``: its bytes are never buffered, and the server answers and
  closes at once (HL7 v2 ACK code AR, docs/architecture.md "Errors"), so a peer streaming
  megabytes without an ``EB`` cannot hold memory or a connection.

The server's guards are those of the DICOM listener (:mod:`dicom_node.listener`), in MLLP terms:
a bounded number of concurrent connections (a connection over the bound is closed at once, never
an older one: MLLP has no handshake that would tell a real peer from a stalled one), an idle
timeout on every read (a peer that connects and sends nothing, or stalls mid-block, is closed),
and a handler failure that ends only its own connection. No payload byte is ever logged: HL7 v2
messages are PHI from the MSH segment on; log lines carry the peer address, a connection number
and fixed reason strings.

**TLS** (:mod:`hl7.tls`, ``[hl7.tls]``): given an SSL context the server speaks TLS only. The
handshake runs in the connection's thread (a slow or half-open client holds its own slot, never
the accept loop) within the handshake timeout; a connection that fails it is closed before any
byte is read as MLLP, so a plain-TCP sender on the TLS port gets no HL7 processing. The frame
decoder, the size limit and the idle timeout then work on the decrypted stream exactly as on a
plain one, and the fingerprint of the client certificate rides in :class:`ConnectionInfo` for
the application to match against its peers. Without a context nothing of this runs: the plain
path is the code it always was.
"""

from __future__ import annotations

import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final

import structlog

from conf.errors import InvalidInputError, UnavailableError
from conf.tls import peer_certificate_fingerprint
from hl7.tls import HandshakeError, client_handshake, describe_client_failure, server_handshake, wrap_server

log = structlog.get_logger(__name__)

#: Start Block, MLLP "<SB>" (vertical tab).
VT: Final = 0x0B
#: End Block, MLLP "<EB>" (file separator).
FS: Final = 0x1C
#: Carriage return: the last byte of the block trailer ``<EB><CR>``.
CR: Final = 0x0D
LF: Final = 0x0A
START_BLOCK: Final = bytes([VT])
END_BLOCK: Final = bytes([FS, CR])

_DELIMITER = re.compile(rb"[\x0b\x1c]")
_RECV_BYTES = 64 * 1024
#: After a server-initiated close, unread input is drained this long so that the reply already
#: sent (an AR ACK) is not destroyed by the TCP reset that closing with unread data provokes.
_LINGER_SECONDS = 1.0
_LINGER_MAX_BYTES = 4 * 1024 * 1024
_REFUSAL_LOG_INTERVAL = 10.0


class MllpError(UnavailableError):
    """Sending over MLLP failed: the peer refused the connection, did not answer in time, closed
    before a complete reply block, or answered with bytes that are not an MLLP block.

    Retryable (an :class:`~conf.errors.UnavailableError`): MLLP Release 2's reliable delivery is
    "send again until a commit acknowledgement arrives", so a receiver must tolerate seeing a
    message twice (MSH-10, the message control ID, tells it so).
    """


@dataclass(frozen=True)
class Frame:
    """The content of one complete MLLP block (``dddd``), without ``SB`` / ``EB`` / ``CR``.

    The payload is kept out of ``repr`` so that a frame that ends up in a log line or an
    assertion message cannot carry PHI with it.
    """

    payload: bytes = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class FrameError:
    """Bytes that did not form an MLLP block, reported in stream order among the frames.

    ``reason`` is one of the fixed strings below (safe to log: it never holds received bytes).
    """

    reason: str

    JUNK: ClassVar[str] = "junk before start block"
    TOO_LARGE: ClassVar[str] = "frame too large"
    TRUNCATED: ClassVar[str] = "frame truncated by a new start block"

    @property
    def too_large(self) -> bool:
        """A block over the limit: the connection must be closed after the reply (its bytes
        were dropped, and the peer may still be sending them)."""
        return self.reason == self.TOO_LARGE


class FrameDecoder:
    """Incremental MLLP block decoder: bytes in, frames and framing errors out, in stream order.

    Pure (no I/O, no clock), so any split of a byte stream into reads gives the same results as
    the whole stream at once. *max_bytes* bounds the content of one block; what is buffered never
    exceeds it.
    """

    _IDLE = 0  # between blocks: waiting for SB
    _IN_FRAME = 1  # after SB: content bytes
    _AFTER_END = 2  # after EB: a CR completes the trailer
    _JUNK = 3  # skipping bytes outside a block up to the next SB (already reported)
    _OVERSIZE = 4  # skipping the rest of a block over max_bytes (already reported)

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._state = self._IDLE
        self._buffer = bytearray()

    @property
    def in_frame(self) -> bool:
        """Whether a block has been started and not ended: the stream stopping now truncates it."""
        return self._state in (self._IN_FRAME, self._OVERSIZE)

    @property
    def buffered(self) -> int:
        """Content bytes of the unfinished block held in memory (never more than *max_bytes*)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | FrameError]:
        """Consume *data* (any amount, any split) and return what it completed, in order."""
        view = bytes(data)
        out: list[Frame | FrameError] = []
        i, end = 0, len(view)
        while i < end:
            state = self._state
            if state == self._IDLE:
                byte = view[i]
                if byte == VT:
                    self._state = self._IN_FRAME
                    i += 1
                elif byte in (CR, LF):
                    i += 1
                else:
                    out.append(FrameError(FrameError.JUNK))
                    self._state = self._JUNK
            elif state == self._JUNK:
                start = view.find(START_BLOCK, i)
                if start < 0:
                    return out
                self._state = self._IDLE
                i = start
            elif state == self._AFTER_END:
                if view[i] == CR:
                    i += 1
                self._state = self._IDLE  # a missing CR is tolerated: the byte is read as outside a block
            else:  # _IN_FRAME or _OVERSIZE: look for the next SB or EB
                match = _DELIMITER.search(view, i)
                stop = match.start() if match is not None else end
                if state == self._IN_FRAME:
                    if len(self._buffer) + (stop - i) > self.max_bytes:
                        self._buffer.clear()
                        self._state = self._OVERSIZE
                        out.append(FrameError(FrameError.TOO_LARGE))
                    else:
                        self._buffer += view[i:stop]
                if match is None:
                    return out
                delimiter = view[stop]
                if delimiter == FS:
                    if self._state == self._IN_FRAME:
                        out.append(Frame(bytes(self._buffer)))
                    self._state = self._AFTER_END
                else:  # SB: a new block starts; an unfinished, not oversized one was truncated
                    if self._state == self._IN_FRAME:
                        out.append(FrameError(FrameError.TRUNCATED))
                    self._state = self._IN_FRAME
                self._buffer.clear()
                i = stop + 1
        return out


def encode(message: str | bytes) -> bytes:
    """One MLLP block holding *message*: ``<SB> message <EB><CR>``.

    ``str`` is encoded as UTF-8 (MSH-18 ``UNICODE UTF-8``); ``bytes`` are framed as they are, in
    whatever encoding their MSH-18 declares. A message holding ``SB`` or ``EB`` cannot be framed
    (the spec forbids them in the content; the receiver would cut the message there):
    :class:`~conf.errors.InvalidInputError`.
    """
    payload = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    if VT in payload or FS in payload:
        raise InvalidInputError("an MLLP message may not contain the bytes 0x0B or 0x1C")
    return START_BLOCK + payload + END_BLOCK


@dataclass(frozen=True)
class ConnectionInfo:
    """Who sent a frame: the peer's address and the server's number for the connection (unique
    per :class:`MllpServer`, for correlating log lines without logging message content); on a
    TLS connection, the SHA-256 fingerprint (lower-case hex) of the client certificate the peer
    presented and our CA verified (None: plain TCP, or no client certificate)."""

    peer_host: str
    peer_port: int
    connection_id: int
    certificate_sha256: str | None = None


Handler = Callable[[bytes, ConnectionInfo], bytes | None]
FrameErrorHandler = Callable[[FrameError, ConnectionInfo], bytes | None]
#: Called with the peer's address and the failed handshake when a TLS peer fails node
#: authentication (no client certificate when required, or one our CA did not sign).
TlsAuthFailureHandler = Callable[[str, HandshakeError], None]
#: Told the address of each connection refused for ``max_connections`` (after it was closed).
ConnectionRefusedHandler = Callable[[str], None]


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    info: ConnectionInfo
    thread: threading.Thread | None = None


class MllpServer:
    """A threaded MLLP listener: one thread per connection, frames handled in arrival order.

    *handler* is called with the content of every complete block and returns the reply content
    (framed here) or None to send nothing; MLLP Release 2 expects every message to be answered by
    a commit acknowledgement, which for HL7 v2 is the ACK the handler builds. *on_frame_error*
    (optional) is called for every framing error and may return a reply too (an AR ACK for a
    block over *max_message_bytes*, after which the connection is closed). An exception from
    either callback closes its connection only; the server goes on.

    Defences (module docstring): at most *max_connections* concurrent connections, a new one
    beyond is closed at once (``hl7.connection_refused``); every read waits at most
    *idle_timeout* seconds, so a silent peer is closed, while a slow one that keeps sending is
    not; a reply that the peer does not read within *idle_timeout* closes the connection too. A
    peer trickling a block just fast enough keeps its slot; *max_connections* bounds what that
    costs, and *max_message_bytes* bounds how long it can go on.

    With *ssl_context* (:func:`conf.tls.server_context`) the port speaks TLS only: each
    connection completes its handshake in its own thread within *handshake_timeout* seconds
    (default: *idle_timeout*) or is closed unanswered; failures are logged (throttled, address and
    reason) and node-authentication failures reported to *on_tls_auth_failure* (a Security Alert).
    """

    def __init__(
        self,
        bind: str,
        port: int,
        handler: Handler,
        *,
        max_message_bytes: int,
        idle_timeout: float,
        max_connections: int,
        on_frame_error: FrameErrorHandler | None = None,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
        on_tls_auth_failure: TlsAuthFailureHandler | None = None,
        on_connection_refused: ConnectionRefusedHandler | None = None,
    ) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be >= 1")
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if handshake_timeout is not None and handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be > 0")
        self.bind = bind
        self._requested_port = port
        self._port = port
        self.handler = handler
        self.on_frame_error = on_frame_error
        self.max_message_bytes = max_message_bytes
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._connections: dict[int, _Connection] = {}
        self._next_id = 0
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._refused_since_log = 0
        self._last_refusal_log = float("-inf")
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout if handshake_timeout is not None else idle_timeout
        self.on_tls_auth_failure = on_tls_auth_failure
        self.on_connection_refused = on_connection_refused
        self._tls_failures_since_log: dict[str, int] = {}
        self._last_tls_failure_log: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The port listened on: the one the system chose when 0 was given (once started)."""
        return self._port

    @property
    def running(self) -> bool:
        thread = self._accept_thread
        return thread is not None and thread.is_alive() and not self._stopping.is_set()

    @property
    def active_connections(self) -> int:
        """Connections currently open (being served, or closing)."""
        with self._lock:
            return len(self._connections)

    def start(self) -> None:
        """Bind, listen and start accepting. Raises OSError when the address cannot be bound."""
        if self._accept_thread is not None and self._accept_thread.is_alive():
            raise RuntimeError("MllpServer already started")
        self._stopping.clear()
        listener = socket.create_server((self.bind, self._requested_port), backlog=max(16, self.max_connections))
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._accept_thread = threading.Thread(target=self._accept_loop, name="MllpAccept", daemon=True)
        self._accept_thread.start()
        log.info("hl7.listener.started", bind=self.bind, port=self._port, max_connections=self.max_connections,
                 tls=self.ssl_context is not None)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection and join the threads (each up to *timeout*
        seconds: a handler still running past that is left to finish on its own)."""
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._listener = self._wake_r = self._wake_w = None
        with self._lock:
            connections = list(self._connections.values())
        for connection in connections:
            # shutdown, not close: the connection's own thread closes its socket, so the descriptor
            # cannot be reused under a thread still blocked in recv() on it.
            _shutdown(connection.sock)
        deadline = time.monotonic() + timeout
        for connection in connections:
            if connection.thread is not None:
                connection.thread.join(max(0.0, deadline - time.monotonic()))
        still = sum(1 for c in connections if c.thread is not None and c.thread.is_alive())
        if still:
            log.warning("hl7.listener.stop_incomplete", threads_alive=still)
        log.info("hl7.listener.stopped", port=self._port)

    def __enter__(self) -> MllpServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ accepting

    def _accept_loop(self) -> None:
        listener, wake = self._listener, self._wake_r
        assert listener is not None and wake is not None
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while not self._stopping.is_set():
                try:
                    ready = selector.select()
                except OSError:
                    break
                if self._stopping.is_set():
                    break
                if not any(key.fileobj is listener for key, _ in ready):
                    continue
                try:
                    sock, address = listener.accept()
                except OSError:  # the peer reset before accept, EMFILE, ...: keep listening
                    time.sleep(0.01)
                    continue
                self._admit(sock, address)

    def _admit(self, sock: socket.socket, address: tuple[str, int] | tuple[str, int, int, int]) -> None:
        host, peer_port = str(address[0]), int(address[1])
        with self._lock:
            active = len(self._connections)
            if active >= self.max_connections:
                connection = None
            else:
                self._next_id += 1
                info = ConnectionInfo(host, peer_port, self._next_id)
                connection = _Connection(sock, info)
                self._connections[info.connection_id] = connection
        if connection is None:
            self._log_refusal(host, active)
            _close(sock)
            if self.on_connection_refused is not None:
                try:
                    self.on_connection_refused(host)
                except Exception:  # noqa: BLE001 - the accept loop must survive its reporter
                    log.exception("hl7.refusal_report_failed", address=host)
            return
        thread = threading.Thread(
            target=self._serve, args=(connection,), name=f"MllpConnection-{connection.info.connection_id}", daemon=True
        )
        connection.thread = thread
        thread.start()

    def _log_refusal(self, host: str, active: int) -> None:
        """One line per refusal, at most one every few seconds (with the count of those not
        logged): a connection flood must not become a log flood."""
        now = time.monotonic()
        with self._lock:
            self._refused_since_log += 1
            if now - self._last_refusal_log < _REFUSAL_LOG_INTERVAL:
                return
            self._last_refusal_log = now
            refused, self._refused_since_log = self._refused_since_log, 0
        log.warning(
            "hl7.connection_refused", address=host, active=active, max_connections=self.max_connections, refused=refused
        )

    # ------------------------------------------------------------------ one connection

    def _serve(self, connection: _Connection) -> None:
        sock, info = connection.sock, connection.info
        reason = "closed"
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                secured = self._handshake(connection)
                if secured is None:
                    reason = "tls-failed"
                    return
                sock, info = secured, connection.info
            sock.settimeout(self.idle_timeout)
            log.debug("hl7.connection.opened", address=info.peer_host, connection_id=info.connection_id)
            reason = self._exchange(sock, info)
        except OSError:  # the peer reset before the first read
            reason = "reset"
        except Exception as exc:  # noqa: BLE001 - a connection's failure must never reach the server
            reason = "failed"
            log.error("hl7.connection.failed", error=exc.__class__.__name__, connection_id=info.connection_id)
        finally:
            if reason in ("too-large", "handler-failed", "reply-invalid"):
                _linger_close(sock, min(_LINGER_SECONDS, self.idle_timeout))
            else:
                _close(sock)
            with self._lock:
                self._connections.pop(info.connection_id, None)
            log.debug("hl7.connection.closed", reason=reason, connection_id=info.connection_id)

    def _handshake(self, connection: _Connection) -> ssl.SSLSocket | None:
        """The TLS handshake of *connection* (in its own thread): its TLS socket, with the client
        certificate's fingerprint in its info, or None after a failure (logged, maybe reported)."""
        assert self.ssl_context is not None
        info = connection.info
        wrapped = wrap_server(connection.sock, self.ssl_context, self.handshake_timeout)
        error = wrapped if isinstance(wrapped, HandshakeError) else None
        if isinstance(wrapped, ssl.SSLSocket):
            with self._lock:
                # stop() shuts down connection.sock: from now on that must be the TLS socket (the
                # plain one was detached into it), so that stopping interrupts the handshake.
                connection.sock = wrapped
            if self._stopping.is_set():
                _shutdown(wrapped)
            error = server_handshake(wrapped)
            if error is not None:
                _close(wrapped)
        if error is not None:
            if self._stopping.is_set():
                return None
            self._log_tls_failure(info.peer_host, error)
            if error.failure.node_authentication and self.on_tls_auth_failure is not None:
                try:
                    self.on_tls_auth_failure(info.peer_host, error)
                except Exception as exc:  # noqa: BLE001 - the refusal stands even if reporting it failed
                    log.error("hl7.tls_alert_failed", error=exc.__class__.__name__, connection_id=info.connection_id)
            return None
        assert isinstance(wrapped, ssl.SSLSocket)
        connection.info = ConnectionInfo(
            info.peer_host, info.peer_port, info.connection_id, peer_certificate_fingerprint(wrapped)
        )
        return wrapped

    def _log_tls_failure(self, host: str, error: HandshakeError) -> None:
        """One WARN per failure reason every few seconds (with the count of those not logged): a
        scanner or a misconfigured sender retrying in a loop must not become a log flood."""
        reason = error.failure.value
        now = time.monotonic()
        with self._lock:
            self._tls_failures_since_log[reason] = self._tls_failures_since_log.get(reason, 0) + 1
            if now - self._last_tls_failure_log.get(reason, float("-inf")) < _REFUSAL_LOG_INTERVAL:
                return
            self._last_tls_failure_log[reason] = now
            failures = self._tls_failures_since_log.pop(reason)
        log.warning("hl7.tls_handshake_failed", reason=reason, detail=error.detail, address=host, failures=failures)

    def _exchange(self, sock: socket.socket, info: ConnectionInfo) -> str:
        """Read, decode, answer until the connection ends; returns why it ended."""
        decoder = FrameDecoder(self.max_message_bytes)
        while not self._stopping.is_set():
            try:
                data = sock.recv(_RECV_BYTES)
            except TimeoutError:
                log.info(
                    "hl7.connection.idle_timeout",
                    address=info.peer_host,
                    connection_id=info.connection_id,
                    mid_frame=decoder.in_frame,
                )
                return "idle-timeout"
            except OSError:
                return "reset"
            if not data:
                if decoder.in_frame:
                    log.warning("hl7.connection.closed_mid_frame", address=info.peer_host, connection_id=info.connection_id)
                return "peer-closed"
            for item in decoder.feed(data):
                if isinstance(item, FrameError):
                    log.warning("hl7.frame_error", reason=item.reason, address=info.peer_host, connection_id=info.connection_id)
                callback = "handler" if isinstance(item, Frame) else "on_frame_error"
                try:
                    reply = self._dispatch(item, info)
                except Exception as exc:  # noqa: BLE001 - the class only: exception text may quote the message
                    log.error(
                        "hl7.handler_failed", callback=callback, error=exc.__class__.__name__, connection_id=info.connection_id
                    )
                    return "handler-failed"
                if reply is not None:
                    try:
                        block = encode(reply)
                    except InvalidInputError:
                        log.error("hl7.reply_invalid", callback=callback, connection_id=info.connection_id)
                        return "reply-invalid"
                    try:
                        sock.sendall(block)
                    except OSError:  # includes the send timing out: the peer does not read
                        return "send-failed"
                if isinstance(item, FrameError) and item.too_large:
                    return "too-large"
        return "server-stopping"

    def _dispatch(self, item: Frame | FrameError, info: ConnectionInfo) -> bytes | None:
        if isinstance(item, Frame):
            return self.handler(item.payload, info)
        return self.on_frame_error(item, info) if self.on_frame_error is not None else None


class MllpClient:
    """The sending side: one connection per message, closed after the reply.

    MLLP Release 2 (reliable delivery) has the sender wait for the commit acknowledgement of a
    message before sending the next, so a pool would only save the TCP handshake; a fresh
    connection per message never meets a socket the peer closed in the meantime. *max_reply_bytes*
    bounds the reply block (an ACK is small; a longer reply is a framing error).
    """

    def __init__(self, *, max_reply_bytes: int = 1_048_576) -> None:
        self.max_reply_bytes = max_reply_bytes

    def send(
        self, host: str, port: int, message: bytes | str, *, timeout: float, ssl_context: ssl.SSLContext | None = None
    ) -> bytes:
        """Send *message* as one MLLP block to *host*:*port* and return the content of the first
        block that comes back (the ACK). *timeout* bounds the whole exchange: connect, TLS
        handshake, send and reply.

        With *ssl_context* (:func:`conf.tls.client_context`) the block goes over TLS: the
        receiver's certificate is verified (and its host name against *host* when the context
        checks host names), our client certificate presented when the context holds one. A
        handshake that fails (certificate rejected, not TLS, timed out) is a failed attempt like a
        refused connection: :class:`MllpError`.

        Raises :class:`MllpError` (retryable) when the connection is refused or fails, the
        exchange takes longer than *timeout*, the peer closes before a complete block, or the
        reply is not a well-formed block; :class:`~conf.errors.InvalidInputError` when *message*
        cannot be framed (it holds 0x0B or 0x1C; sending it again would not help).
        """
        block = encode(message)
        where = f"MLLP peer {host}:{port}"
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((host, port), timeout=_remaining(deadline, where))
        except ConnectionRefusedError as exc:
            raise MllpError(f"{where}: connection refused") from exc
        except TimeoutError as exc:
            raise MllpError(f"{where}: connect timed out after {timeout:g} s") from exc
        except OSError as exc:
            raise MllpError(f"{where}: cannot connect ({exc.__class__.__name__})") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                try:
                    sock = client_handshake(sock, ssl_context, host, deadline)
                except (OSError, ValueError) as exc:
                    raise MllpError(f"{where}: {describe_client_failure(exc)}") from exc
            return self._exchange(sock, block, deadline, where, timeout)
        finally:
            _close(sock)

    def _exchange(self, sock: socket.socket, block: bytes, deadline: float, where: str, timeout: float) -> bytes:
        decoder = FrameDecoder(self.max_reply_bytes)
        try:
            sock.settimeout(_remaining(deadline, where))
            sock.sendall(block)
            while True:
                sock.settimeout(_remaining(deadline, where))
                data = sock.recv(_RECV_BYTES)
                if not data:
                    raise MllpError(f"{where}: connection closed before a complete reply")
                for item in decoder.feed(data):
                    if isinstance(item, FrameError):
                        raise MllpError(f"{where}: malformed reply ({item.reason})")
                    return item.payload
        except TimeoutError as exc:
            raise MllpError(f"{where}: no reply within {timeout:g} s") from exc
        except MllpError:
            raise
        except OSError as exc:
            raise MllpError(f"{where}: connection failed ({exc.__class__.__name__})") from exc


def _remaining(deadline: float, where: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(where)
    return left


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    _shutdown(sock)
    sock.close()


def _linger_close(sock: socket.socket, seconds: float) -> None:
    """Close after a reply the peer must still get (an AR ACK), though it may still be sending.

    Closing a socket with unread input makes the kernel send a TCP reset, and a reset makes the
    peer's kernel drop what it had received and not yet read: the AR ACK. So: send FIN after the
    reply (SHUT_WR), then read and discard until the peer closes too, for at most *seconds*.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        drained = 0
        while drained < _LINGER_MAX_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            chunk = sock.recv(_RECV_BYTES)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
    sock.close()
