"""A real RFC 5425 syslog-over-TLS receiver for tests: an Audit Record Repository stand-in.

It listens on a TCP port with an ``ssl`` server context (our BCP 195 profile, client certificates
required and checked against a CA), splits the byte stream into octet-counted frames
(RFC 5425 §4.3) and parses each as an RFC 5424 message with a strict reading of the ABNF of
RFC 5424 §6, independent of the sender's code. It can be stopped and started again on the same
port to play a repository that goes down and comes back.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conf.tls import TlsSettings, server_context

_HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) (?P<timestamp>\S+) (?P<hostname>[!-~]{1,255}) "
    rb"(?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) (?P<sd>-|\[[^\]]*\](?:\[[^\]]*\])*)"
    rb"(?: (?P<msg>.*))?\Z",
    re.DOTALL,
)
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})\Z")


class SyslogParseError(ValueError):
    pass


@dataclass(frozen=True)
class SyslogMessage:
    pri: int
    version: int
    timestamp: dt.datetime
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes
    raw: bytes

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8


def parse_message(raw: bytes) -> SyslogMessage:
    """One SYSLOG-MSG, per RFC 5424 §6 (raises :class:`SyslogParseError` on any deviation)."""
    match = _HEADER.match(raw)
    if match is None:
        raise SyslogParseError(f"not an RFC 5424 message: {raw[:120]!r}")
    pri = int(match["pri"])
    if pri > 191 or (len(match["pri"]) > 1 and match["pri"].startswith(b"0")):
        raise SyslogParseError(f"PRI out of range: {pri}")
    stamp = match["timestamp"].decode("ascii")
    if not _TIMESTAMP.match(stamp):
        raise SyslogParseError(f"TIMESTAMP is not RFC 3339 with a zone: {stamp}")
    when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return SyslogMessage(
        pri=pri,
        version=int(match["version"]),
        timestamp=when,
        hostname=match["hostname"].decode("ascii"),
        app_name=match["app"].decode("ascii"),
        procid=match["procid"].decode("ascii"),
        msgid=match["msgid"].decode("ascii"),
        structured_data=match["sd"].decode("utf-8"),
        msg=match["msg"] or b"",
        raw=raw,
    )


def split_frames(buffer: bytearray) -> list[bytes]:
    """Remove and return every complete ``MSG-LEN SP SYSLOG-MSG`` frame at the start of *buffer*."""
    frames: list[bytes] = []
    while True:
        space = buffer.find(b" ", 0, 12)
        if space <= 0:
            if len(buffer) >= 12 or (buffer and not buffer[: len(buffer)].isdigit()):
                raise SyslogParseError(f"no MSG-LEN at the start of {bytes(buffer[:20])!r}")
            return frames
        digits = bytes(buffer[:space])
        if not digits.isdigit() or digits.startswith(b"0"):
            raise SyslogParseError(f"bad MSG-LEN {digits!r}")
        length = int(digits)
        if len(buffer) < space + 1 + length:
            return frames
        frames.append(bytes(buffer[space + 1 : space + 1 + length]))
        del buffer[: space + 1 + length]


class TlsSyslogReceiver:
    """Accepts TLS connections on 127.0.0.1:*port* and collects the parsed messages in order."""

    def __init__(self, cert_file: Path, key_file: Path, ca_file: Path, *, port: int = 0) -> None:
        self.context = server_context(
            TlsSettings(cert_file=cert_file, key_file=key_file, ca_file=ca_file, require_client_cert=True)
        )
        self.port = port
        self.messages: list[SyslogMessage] = []
        self.errors: list[str] = []
        self.client_subjects: list[str] = []
        self.connections = 0
        self._cond = threading.Condition()
        self._listener: socket.socket | None = None
        self._open: list[ssl.SSLSocket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def start(self) -> TlsSyslogReceiver:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stopping.clear()
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Close the listener and every open connection (the repository goes down)."""
        self._stopping.set()
        if self._listener is not None:
            try:  # wakes the thread blocked in accept() (close() alone would leave it listening)
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._cond:
            open_now, self._open = self._open, []
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(5)
        self._threads = []

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            sock = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            with self._cond:
                self.errors.append(f"handshake: {exc}")
                self._cond.notify_all()
            raw.close()
            return
        peer: dict[str, Any] = dict(sock.getpeercert() or {})
        common_names = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
        with self._cond:
            self.connections += 1
            self.client_subjects.append(common_names[0] if common_names else "")
            self._open.append(sock)
        buffer = bytearray()
        sock.settimeout(None)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                buffer.extend(data)
                parsed = [parse_message(f) for f in split_frames(buffer)]
                if parsed:
                    with self._cond:
                        self.messages.extend(parsed)
                        self._cond.notify_all()
        except (OSError, SyslogParseError) as exc:
            if not self._stopping.is_set():
                with self._cond:
                    self.errors.append(f"{exc.__class__.__name__}: {exc}")
                    self._cond.notify_all()
        finally:
            sock.close()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[SyslogMessage]:
        """Block until at least *count* messages arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.messages)} of {count} syslog messages arrived; errors: {self.errors}")
                self._cond.wait(left)
            return list(self.messages)

    def wait_for_error(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.errors:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("the receiver saw no failed connection")
                self._cond.wait(left)
            return self.errors[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
