"""MLLP framing, server and client (hl7/mllp.py) over real sockets on 127.0.0.1.

* :class:`FrameDecoder`: a table of streams and what they decode to, and properties (hypothesis):
  any split of a stream into reads decodes the same; framed messages decode to themselves; the
  buffer never exceeds the limit.
* :class:`MllpServer`, from plain sockets: pipelined messages answered in order, a message
  trickling in one byte at a time, junk, truncated and oversized blocks, the idle timeout, the
  connection limit, failing callbacks (their connection only), stop().
* :class:`MllpClient` against the server and against scripted peers that refuse, never answer,
  close mid-block or answer junk.
* A fuzz run (fixed seed, ``PNEUMO_MLLP_FUZZ_SEED`` / ``PNEUMO_MLLP_FUZZ_CASES``): malformed
  streams over new and reused connections; every reply the server sends must be exactly what a
  local :class:`FrameDecoder` predicts, every close must be one it predicts, nothing may hang; a
  fresh connection is still answered at the end and no connection thread is left behind.

No log line may contain message content (conf/logging.py): the tests that make the server fail
on a message carrying a patient name check the captured log lines for it.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from conf.errors import InvalidInputError, UnavailableError
from hl7.mllp import (
    ConnectionInfo,
    Frame,
    FrameDecoder,
    FrameError,
    MllpClient,
    MllpError,
    MllpServer,
    encode,
)

HOST = "127.0.0.1"
VT, FS, CR = b"\x0b", b"\x1c", b"\r"
JUNK, TOO_LARGE, TRUNCATED = FrameError.JUNK, FrameError.TOO_LARGE, FrameError.TRUNCATED
PHI_NAME = "DOE^JANE"
ADT = f"MSH|^~\\&|HIS|HOSP|PNEUMO|RAD|20240102030405||ADT^A01|MSG00001|P|2.5.1\rPID|1||123456^^^HOSP^MR||{PHI_NAME}\r"


def frame(payload: bytes | str) -> bytes:
    return encode(payload)


# ---------------------------------------------------------------------------- FrameDecoder


def _results(items: list[Frame | FrameError]) -> list[bytes | str]:
    """Frames as their payload bytes, errors as their reason string."""
    return [item.payload if isinstance(item, Frame) else item.reason for item in items]


def _decode(chunks: list[bytes], max_bytes: int = 64) -> list[bytes | str]:
    decoder = FrameDecoder(max_bytes)
    out: list[Frame | FrameError] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return _results(out)


DECODER_CASES: list[tuple[str, list[bytes], list[bytes | str]]] = [
    ("one block", [VT + b"abc" + FS + CR], [b"abc"]),
    ("three blocks in one read", [VT + b"a" + FS + CR + VT + b"b" + FS + CR + VT + b"c" + FS + CR], [b"a", b"b", b"c"]),
    ("one block in one-byte reads", [bytes([b]) for b in VT + b"hello" + FS + CR], [b"hello"]),
    ("split inside the trailer", [VT + b"ab" + FS, CR + VT + b"cd" + FS, CR], [b"ab", b"cd"]),
    ("empty block", [VT + FS + CR], [b""]),
    ("segments keep their CRs", [VT + b"MSH|1\rPID|2\r" + FS + CR], [b"MSH|1\rPID|2\r"]),
    ("bytes stay bytes", [VT + "é€".encode() + b"\xe9\xff\x00" + FS + CR], ["é€".encode() + b"\xe9\xff\x00"]),
    ("junk before start block, reported once", [b"xyz\r\n123" + VT + b"a" + FS + CR], [JUNK, b"a"]),
    ("junk over several reads, reported once", [b"xx", b"yy\r", b"zz", VT + b"a" + FS + CR], [JUNK, b"a"]),
    ("junk between blocks", [VT + b"a" + FS + CR + b"!!" + VT + b"b" + FS + CR], [b"a", JUNK, b"b"]),
    ("CR and LF between blocks are not junk", [b"\r\n" + VT + b"a" + FS + CR + b"\n\r\n" + VT + b"b" + FS + CR], [b"a", b"b"]),
    ("stray end block outside a block is junk", [FS + CR + VT + b"a" + FS + CR], [JUNK, b"a"]),
    ("EB without CR, then SB: both delivered", [VT + b"a" + FS + VT + b"b" + FS + CR], [b"a", b"b"]),
    ("EB without CR at the end: delivered at once", [VT + b"a" + FS], [b"a"]),
    ("EB without CR, then junk", [VT + b"a" + FS + b"zz" + VT + b"b" + FS], [b"a", JUNK, b"b"]),
    ("EB, LF instead of CR: tolerated", [VT + b"a" + FS + b"\n" + VT + b"b" + FS + CR], [b"a", b"b"]),
    ("SB inside a block truncates it", [VT + b"abc" + VT + b"def" + FS + CR], [TRUNCATED, b"def"]),
    ("SB inside a block, over reads", [VT + b"ab", b"c" + VT, b"def" + FS + CR], [TRUNCATED, b"def"]),
    ("SB SB", [VT + VT + b"x" + FS + CR], [TRUNCATED, b"x"]),
    ("unfinished block: nothing yet", [VT + b"abc"], []),
    ("exactly the limit", [VT + b"x" * 64 + FS + CR], [b"x" * 64]),
    ("one over the limit, then a good block", [VT + b"x" * 65 + FS + CR + VT + b"ok" + FS + CR], [TOO_LARGE, b"ok"]),
    ("too large reported before its end block", [VT + b"x" * 65], [TOO_LARGE]),
    ("too large over many reads, reported once", [VT] + [b"x" * 30] * 10 + [FS + CR, VT + b"ok" + FS + CR], [TOO_LARGE, b"ok"]),
    ("SB inside an oversized block starts a new one", [VT + b"x" * 100 + VT + b"ok" + FS + CR], [TOO_LARGE, b"ok"]),
]


@pytest.mark.parametrize(("chunks", "expected"), [c[1:] for c in DECODER_CASES], ids=[c[0] for c in DECODER_CASES])
def test_decoder_table(chunks: list[bytes], expected: list[bytes | str]) -> None:
    assert _decode(chunks) == expected
    # The same stream in one read, and one byte at a time, decodes the same.
    whole = b"".join(chunks)
    assert _decode([whole]) == expected
    assert _decode([whole[i : i + 1] for i in range(len(whole))]) == expected


def test_decoder_state() -> None:
    decoder = FrameDecoder(8)
    assert not decoder.in_frame
    decoder.feed(VT + b"abc")
    assert decoder.in_frame and decoder.buffered == 3
    decoder.feed(b"x" * 10)
    assert decoder.in_frame and decoder.buffered == 0  # oversized: nothing kept
    decoder.feed(FS)
    assert not decoder.in_frame
    assert "abc" not in repr(Frame(b"abc"))  # payloads stay out of reprs (and so out of logs)


_STREAM_BYTES = st.sampled_from([VT, FS, CR, b"\n", b"a", b"b", b"|", b"\xe9", b"\x00"])


@settings(max_examples=400, deadline=None)
@given(stream=st.lists(_STREAM_BYTES, max_size=200).map(b"".join), cuts=st.lists(st.integers(0, 200), max_size=20))
def test_decoder_any_split_decodes_the_same(stream: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:], strict=False)]
    decoder = FrameDecoder(16)
    out: list[Frame | FrameError] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
        assert decoder.buffered <= 16
    assert _results(out) == _decode([stream], 16)


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(st.binary(max_size=100).map(lambda b: b.replace(VT, b"v").replace(FS, b"f")), max_size=8))
def test_encoded_messages_decode_to_themselves(messages: list[bytes]) -> None:
    assert _decode([b"".join(encode(m) for m in messages)], 100) == messages


def test_encode() -> None:
    assert encode("MSH|é") == VT + "MSH|é".encode() + FS + CR
    assert encode(b"MSH|\xe9") == VT + b"MSH|\xe9" + FS + CR
    for bad in (b"a\x0bb", b"a\x1cb", "a\x1c"):
        with pytest.raises(InvalidInputError):
            encode(bad)


# ---------------------------------------------------------------------------- server helpers


@dataclass
class Recorder:
    """An echo-ish handler: ``ACK:`` + the payload; ``BOOM`` in a payload raises (with the
    payload in the exception text, as a careless parser would); ``NONE`` answers nothing."""

    calls: list[tuple[bytes, ConnectionInfo]] = field(default_factory=list)
    errors: list[tuple[str, ConnectionInfo]] = field(default_factory=list)
    delay: float = 0.0

    def handler(self, payload: bytes, info: ConnectionInfo) -> bytes | None:
        self.calls.append((payload, info))
        if self.delay:
            time.sleep(self.delay)
        if b"BOOM" in payload:
            raise ValueError(f"cannot parse {payload!r}")
        if b"NONE" in payload:
            return None
        return b"ACK:" + payload

    def on_frame_error(self, error: FrameError, info: ConnectionInfo) -> bytes | None:
        self.errors.append((error.reason, info))
        return b"ERR:" + error.reason.encode()


@contextmanager
def running_server(recorder: Recorder | None = None, **overrides: Any) -> Iterator[MllpServer]:
    recorder = recorder or Recorder()
    options: dict[str, Any] = {
        "max_message_bytes": 1024,
        "idle_timeout": 2.0,
        "max_connections": 8,
        "on_frame_error": recorder.on_frame_error,
    }
    options.update(overrides)
    server = MllpServer(HOST, 0, recorder.handler, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def _server_with(handler: Callable[[bytes, ConnectionInfo], bytes | None], **options: Any) -> Iterator[MllpServer]:
    server = MllpServer(HOST, 0, handler, max_message_bytes=1024, idle_timeout=2.0, max_connections=4, **options)
    with server:
        yield server


def connect(server: MllpServer) -> socket.socket:
    sock = socket.create_connection((HOST, server.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@dataclass
class Received:
    payloads: list[bytes]
    closed: bool  # EOF or reset seen
    errors: list[str]  # framing errors in what the server sent (must stay empty)


def receive(sock: socket.socket, count: int | None = None, timeout: float = 5.0, until: bytes | None = None) -> Received:
    """Read replies until *count* arrived, a reply equal to *until* arrived, or the connection
    closed; fail the test when none of that happens within *timeout*."""
    decoder = FrameDecoder(1 << 20)
    payloads: list[bytes] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        if count is not None and len(payloads) >= count:
            return Received(payloads, False, errors)
        if until is not None and until in payloads:
            return Received(payloads, False, errors)
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no reply and no close within {timeout} s (got {len(payloads)} replies)")
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return Received(payloads, True, errors)
        if not data:
            return Received(payloads, True, errors)
        for item in decoder.feed(data):
            if isinstance(item, Frame):
                payloads.append(item.payload)
            else:
                errors.append(item.reason)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# ---------------------------------------------------------------------------- server


def test_several_messages_in_one_write_answered_in_order() -> None:
    recorder = Recorder(delay=0.01)
    with running_server(recorder) as server, connect(server) as sock:
        assert server.running and server.port > 0
        messages = [f"MSG{i}".encode() for i in range(5)]
        sock.sendall(b"".join(frame(m) for m in messages))
        got = receive(sock, count=5)
        assert got.payloads == [b"ACK:" + m for m in messages] and not got.errors
        infos = {info for _, info in recorder.calls}
        assert len(infos) == 1
        info = infos.pop()
        assert (info.peer_host, info.peer_port) == sock.getsockname()
        # The same connection goes on: several messages per connection.
        sock.sendall(frame(ADT))
        assert receive(sock, count=1).payloads == [b"ACK:" + ADT.encode()]


def test_message_in_one_byte_writes_slower_than_idle_timeout_in_total() -> None:
    with running_server(idle_timeout=0.3) as server, connect(server) as sock:
        block = frame(ADT[:60])
        started = time.monotonic()
        for byte in block:
            sock.sendall(bytes([byte]))
            time.sleep(0.01)
        assert time.monotonic() - started > 0.3 * 1.5  # each read within the timeout, the whole not
        assert receive(sock, count=1).payloads == [b"ACK:" + ADT[:60].encode()]


def test_junk_before_start_block() -> None:
    recorder = Recorder()
    with running_server(recorder) as server, connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + frame(b"MSG"))
        got = receive(sock, count=2)
        assert got.payloads == [b"ERR:" + JUNK.encode(), b"ACK:MSG"]
        assert [reason for reason, _ in recorder.errors] == [JUNK]


def test_truncated_block_then_a_good_one() -> None:
    recorder = Recorder()
    with running_server(recorder) as server, connect(server) as sock:
        sock.sendall(VT + b"MSH|half")
        time.sleep(0.05)
        sock.sendall(frame(b"MSH|whole"))
        got = receive(sock, count=2)
        assert got.payloads == [b"ERR:" + TRUNCATED.encode(), b"ACK:MSH|whole"]
        assert [payload for payload, _ in recorder.calls] == [b"MSH|whole"]


@pytest.mark.parametrize("with_end_block", [True, False], ids=["ended", "never-ended"])
def test_oversized_block_answered_then_closed(with_end_block: bool) -> None:
    recorder = Recorder()
    with running_server(recorder, max_message_bytes=1024) as server, connect(server) as sock:
        sock.sendall(frame(b"first"))
        assert receive(sock, count=1).payloads == [b"ACK:first"]
        started = time.monotonic()
        sock.sendall(VT + b"x" * 5000 + (FS + CR + frame(b"after") if with_end_block else b""))
        got = receive(sock)
        assert got.closed and got.payloads == [b"ERR:" + TOO_LARGE.encode()]
        assert time.monotonic() - started < 1.5  # closed at once, not after the idle timeout
        assert [reason for reason, _ in recorder.errors] == [TOO_LARGE]
        assert [payload for payload, _ in recorder.calls] == [b"first"]  # "after" never reached the handler
        wait_for(lambda: server.active_connections == 0)


def test_limit_is_the_payload_size() -> None:
    with running_server(max_message_bytes=1024) as server, connect(server) as sock:
        sock.sendall(frame(b"y" * 1024))
        assert receive(sock, count=1).payloads == [b"ACK:" + b"y" * 1024]


@pytest.mark.parametrize("partial", [b"", VT + b"MSH|"], ids=["silent", "mid-block"])
def test_idle_client_closed_after_timeout(partial: bytes) -> None:
    with (
        structlog.testing.capture_logs() as lines,
        running_server(idle_timeout=0.3) as server,
        connect(server) as sock,
    ):
        started = time.monotonic()
        sock.sendall(partial)
        got = receive(sock, timeout=3.0)
        elapsed = time.monotonic() - started
        assert got.closed and not got.payloads
        assert 0.25 <= elapsed < 1.5
        wait_for(lambda: server.active_connections == 0)
    idle = [line for line in lines if line["event"] == "hl7.connection.idle_timeout"]
    assert len(idle) == 1 and idle[0]["mid_frame"] is bool(partial)


def test_max_connections_enforced() -> None:
    with structlog.testing.capture_logs() as lines, running_server(max_connections=2) as server:
        first, second = connect(server), connect(server)
        for sock in (first, second):  # both are being served
            sock.sendall(frame(b"hello"))
            assert receive(sock, count=1).payloads == [b"ACK:hello"]
        with connect(server) as third:
            started = time.monotonic()
            got = receive(third, timeout=2.0)
            assert got.closed and not got.payloads and time.monotonic() - started < 1.0
        # The admitted ones are unaffected; once one leaves, a new connection is served.
        second.sendall(frame(b"still"))
        assert receive(second, count=1).payloads == [b"ACK:still"]
        first.close()
        wait_for(lambda: server.active_connections == 1)
        with connect(server) as fourth:
            fourth.sendall(frame(b"now"))
            assert receive(fourth, count=1).payloads == [b"ACK:now"]
        second.close()
    refused = [line for line in lines if line["event"] == "hl7.connection_refused"]
    assert len(refused) == 1
    assert refused[0]["active"] == 2 and refused[0]["max_connections"] == 2 and refused[0]["refused"] == 1


def test_handler_exception_closes_only_its_connection_and_logs_no_phi() -> None:
    recorder = Recorder()
    with structlog.testing.capture_logs() as lines, running_server(recorder) as server:
        with connect(server) as other:
            with connect(server) as victim:
                victim.sendall(frame(ADT + "BOOM") + frame(b"never handled"))
                got = receive(victim)
                assert got.closed and not got.payloads
            other.sendall(frame(b"fine"))
            assert receive(other, count=1).payloads == [b"ACK:fine"]
        with connect(server) as fresh:
            fresh.sendall(frame(ADT))
            assert receive(fresh, count=1).payloads == [b"ACK:" + ADT.encode()]
        assert server.running
    assert b"never handled" not in [payload for payload, _ in recorder.calls]
    failed = [line for line in lines if line["event"] == "hl7.handler_failed"]
    assert len(failed) == 1 and failed[0]["error"] == "ValueError" and failed[0]["callback"] == "handler"
    everything = repr(lines)
    assert "DOE" not in everything and "123456" not in everything and "MSH" not in everything


def test_frame_error_callback_exception_closes_the_connection() -> None:
    def on_frame_error(error: FrameError, info: ConnectionInfo) -> bytes | None:
        raise RuntimeError("broken")

    with running_server(on_frame_error=on_frame_error) as server:
        with connect(server) as sock:
            sock.sendall(b"junk" + frame(b"x"))
            got = receive(sock)
            assert got.closed and not got.payloads
        with connect(server) as sock:
            sock.sendall(frame(b"y"))
            assert receive(sock, count=1).payloads == [b"ACK:y"]


def test_no_reply_and_unframeable_reply() -> None:
    def handler(payload: bytes, info: ConnectionInfo) -> bytes | None:
        return None if payload == b"quiet" else b"bad\x1creply" if payload == b"bad" else b"ok"

    with _server_with(handler) as server, connect(server) as sock:
        sock.sendall(frame(b"quiet") + frame(b"loud"))
        assert receive(sock, count=1).payloads == [b"ok"]  # nothing sent for "quiet"
        sock.sendall(frame(b"bad"))
        got = receive(sock)
        assert got.closed and not got.payloads


def test_slow_handler_does_not_block_other_connections() -> None:
    release = threading.Event()

    def handler(payload: bytes, info: ConnectionInfo) -> bytes | None:
        if payload == b"wait":
            release.wait(5)
        return b"ACK:" + payload

    with _server_with(handler) as server, connect(server) as slow, connect(server) as quick:
        slow.sendall(frame(b"wait"))
        quick.sendall(frame(b"go"))
        assert receive(quick, count=1).payloads == [b"ACK:go"]
        release.set()
        assert receive(slow, count=1).payloads == [b"ACK:wait"]


def test_stop_closes_connections_and_listener() -> None:
    server = MllpServer(HOST, 0, Recorder().handler, max_message_bytes=1024, idle_timeout=30, max_connections=4)
    server.start()
    port = server.port
    sock = connect(server)
    sock.sendall(VT + b"partial")
    wait_for(lambda: server.active_connections == 1)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.0
    assert not server.running and server.active_connections == 0
    assert receive(sock, timeout=2.0).closed
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=2).close()
    assert not [t for t in threading.enumerate() if t.name.startswith("Mllp")]


# ---------------------------------------------------------------------------- client


@contextmanager
def scripted_peer(script: Callable[[socket.socket], None]) -> Iterator[int]:
    """A one-connection TCP peer that runs *script* on the accepted socket; yields its port."""
    listener = socket.create_server((HOST, 0))
    listener.settimeout(5)

    def run() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            script(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        thread.join(5)
        listener.close()


def _read_one_block(conn: socket.socket) -> bytes:
    decoder = FrameDecoder(1 << 20)
    conn.settimeout(5)
    while True:
        for item in decoder.feed(conn.recv(4096)):
            assert isinstance(item, Frame)
            return item.payload


def test_client_gets_the_reply() -> None:
    with running_server() as server:
        client = MllpClient()
        assert client.send(HOST, server.port, ADT, timeout=2.0) == b"ACK:" + ADT.encode()
        assert client.send(HOST, server.port, b"MSH|\xe9", timeout=2.0) == b"ACK:MSH|\xe9"


def test_client_refused_port() -> None:
    probe = socket.socket()
    probe.bind((HOST, 0))
    port = probe.getsockname()[1]
    probe.close()  # bound, never listened: nobody is there
    with pytest.raises(MllpError, match="refused") as raised:
        MllpClient().send(HOST, port, ADT, timeout=2.0)
    assert isinstance(raised.value, UnavailableError) and raised.value.retryable


def test_client_times_out_on_a_silent_peer() -> None:
    with scripted_peer(lambda conn: (_read_one_block(conn), time.sleep(1.0))) as port:
        started = time.monotonic()
        with pytest.raises(MllpError, match="no reply"):
            MllpClient().send(HOST, port, ADT, timeout=0.3)
        assert 0.25 <= time.monotonic() - started < 2.0


def test_client_times_out_on_a_handler_that_answers_nothing() -> None:
    with running_server() as server, pytest.raises(MllpError):
        MllpClient().send(HOST, server.port, b"NONE", timeout=0.3)


def test_client_peer_closes_mid_block() -> None:
    def script(conn: socket.socket) -> None:
        _read_one_block(conn)
        conn.sendall(VT + b"MSH|^~\\&|PNEUMO|RAD\rMSA|A")

    with scripted_peer(script) as port, pytest.raises(MllpError, match="closed before"):
        MllpClient().send(HOST, port, ADT, timeout=2.0)


def test_client_peer_closes_without_answer() -> None:
    with scripted_peer(lambda conn: None) as port, pytest.raises(MllpError):
        MllpClient().send(HOST, port, ADT, timeout=2.0)


@pytest.mark.parametrize(
    "reply",
    [b"HTTP/1.1 400 Bad Request\r\n\r\n", VT + b"x" * 200 + FS + CR, VT + b"a" + VT],
    ids=["junk", "too-large", "truncated"],
)
def test_client_malformed_reply(reply: bytes) -> None:
    def script(conn: socket.socket) -> None:
        _read_one_block(conn)
        conn.sendall(reply)
        time.sleep(0.2)

    with scripted_peer(script) as port, pytest.raises(MllpError, match="malformed reply"):
        MllpClient(max_reply_bytes=100).send(HOST, port, ADT, timeout=2.0)


def test_client_reply_split_over_reads() -> None:
    def script(conn: socket.socket) -> None:
        _read_one_block(conn)
        for byte in frame(b"MSA|AA|1"):
            conn.sendall(bytes([byte]))
            time.sleep(0.005)

    with scripted_peer(script) as port:
        assert MllpClient().send(HOST, port, ADT, timeout=2.0) == b"MSA|AA|1"


def test_client_refuses_unframeable_message() -> None:
    with pytest.raises(InvalidInputError):
        MllpClient().send(HOST, 9, b"a\x1cb", timeout=1.0)


# ---------------------------------------------------------------------------- fuzz

FUZZ_SEED = int(os.environ.get("PNEUMO_MLLP_FUZZ_SEED", "20250101"))
FUZZ_CASES = int(os.environ.get("PNEUMO_MLLP_FUZZ_CASES", "2000"))
FUZZ_MAX_BYTES = 4096
FUZZ_CASE_LIMIT = 5.0


def _fuzz_handler(payload: bytes, info: ConnectionInfo) -> bytes | None:
    if b"BOOM" in payload:
        raise ValueError("boom")
    return b"ACK:" + payload


def _fuzz_on_frame_error(error: FrameError, info: ConnectionInfo) -> bytes | None:
    return b"AR:" + error.reason.encode() if error.too_large else None


def _predict(stream: bytes) -> tuple[list[bytes], bool]:
    """What the server must send for *stream* on a connection between blocks, and whether it
    must then close (a handler failure, a block over the limit)."""
    replies: list[bytes] = []
    for item in FrameDecoder(FUZZ_MAX_BYTES).feed(stream):
        if isinstance(item, Frame):
            if b"BOOM" in item.payload:
                return replies, True
            replies.append(b"ACK:" + item.payload)
        elif item.too_large:
            replies.append(b"AR:" + item.reason.encode())
            return replies, True
    return replies, False


def _fuzz_stream(rng: random.Random) -> bytes:
    def text(n: int) -> bytes:
        return bytes(rng.choice(b"MSHPIDOBR|^~\\&0123456789 abc\r") for _ in range(n))

    def sprinkled(n: int) -> bytes:
        return bytes(rng.choice([0x0B, 0x1C, 0x0D, 0x0A, 0x41, 0x7C, 0xE9, 0x00]) for _ in range(n))

    def mutated_adt() -> bytes:
        data = bytearray(ADT.encode())
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[pos] ^= 1 << rng.randrange(8)
            elif op == 1:
                data.insert(pos, rng.choice([0x0B, 0x1C, 0x0D]))
            else:
                del data[pos : pos + rng.randint(1, 20)]
        return VT + bytes(data) + FS + CR

    kind = rng.randrange(11)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 400))
    if kind == 1:
        return sprinkled(rng.randint(1, 200))
    if kind == 2:  # good blocks with junk, stray delimiters, missing CRs in between
        parts = []
        for _ in range(rng.randint(1, 5)):
            parts.append(VT + text(rng.randint(0, 200)) + FS + rng.choice([CR, CR, b"", b"\r\n"]))
            if rng.random() < 0.3:
                parts.append(rng.choice([text(rng.randint(1, 10)), FS, CR + CR, rng.randbytes(3)]))
        return b"".join(parts)
    if kind == 3:  # truncated: no end block (the next block truncates it)
        return VT + text(rng.randint(0, 300))
    if kind == 4:  # SB inside a block
        return VT + text(rng.randint(0, 50)) + VT + text(rng.randint(0, 50)) + FS + CR
    if kind == 5:  # huge block, ended or not
        return VT + b"Z" * rng.randint(FUZZ_MAX_BYTES + 1, 60_000) + rng.choice([FS + CR, b""])
    if kind == 6:  # exactly at / just under the limit
        return VT + b"L" * rng.choice([FUZZ_MAX_BYTES, FUZZ_MAX_BYTES - 1]) + FS + CR
    if kind == 7:
        return mutated_adt()
    if kind == 8:  # a block whose handler fails
        return VT + text(rng.randint(0, 20)) + b"BOOM" + FS + CR
    if kind == 9:  # lots of junk, no SB at all
        return bytes(b for b in rng.randbytes(rng.randint(1, 20_000)) if b != 0x0B)
    return b"".join(mutated_adt() for _ in range(rng.randint(2, 4)))


def _send_in_pieces(sock: socket.socket, data: bytes, rng: random.Random) -> bool:
    """Send *data* whole or in random pieces; False when the server has already closed."""
    try:
        if rng.random() < 0.5:
            sock.sendall(data)
        else:
            i = 0
            while i < len(data):
                n = rng.choice([1, 2, 7, 100, 5000])
                sock.sendall(data[i : i + n])
                i += n
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def test_fuzz_server_answers_or_closes_and_keeps_serving() -> None:
    rng = random.Random(FUZZ_SEED)
    outcomes = {"answered": 0, "closed": 0, "half_closed": 0, "abandoned": 0, "new_connections": 0}
    started = time.monotonic()
    with (
        structlog.testing.capture_logs(),  # the fuzz log lines are not the subject here
        MllpServer(
            HOST, 0, _fuzz_handler, max_message_bytes=FUZZ_MAX_BYTES, idle_timeout=3.0, max_connections=32,
            on_frame_error=_fuzz_on_frame_error,
        ) as server,
    ):
        pool: list[socket.socket] = []
        for case in range(FUZZ_CASES):
            stream = _fuzz_stream(rng)
            if pool and rng.random() < 0.7:
                sock = pool.pop(rng.randrange(len(pool)))
            else:
                sock = connect(server)
                outcomes["new_connections"] += 1
            ending = rng.choices(["probe", "half-close", "abandon"], weights=[80, 15, 5])[0]
            where = f"case {case} (seed {FUZZ_SEED}, {len(stream)} bytes, ending {ending})"
            if ending == "abandon":  # the client vanishes mid-stream
                _send_in_pieces(sock, stream[: rng.randint(0, len(stream))], rng)
                sock.close()
                outcomes["abandoned"] += 1
                continue
            probe = f"PROBE-{case}-{rng.getrandbits(32)}".encode()
            expected, must_close = _predict(stream)
            if ending == "probe":
                payload = stream + frame(probe)
                if not must_close:
                    expected = [*expected, b"ACK:" + probe]
            else:
                payload = stream
            _send_in_pieces(sock, payload, rng)
            if ending == "half-close":
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                must_close = True
            got = receive(sock, timeout=FUZZ_CASE_LIMIT, until=None if must_close else b"ACK:" + probe)
            assert not got.errors, f"{where}: the server sent a malformed block"
            assert got.payloads == expected, f"{where}: replies differ from the prediction"
            assert got.closed == must_close, f"{where}: closed={got.closed}, expected {must_close}"
            if got.closed:
                outcomes["half_closed" if ending == "half-close" else "closed"] += 1
                sock.close()
            else:
                outcomes["answered"] += 1
                pool.append(sock)
        for sock in pool:
            sock.close()
        # Still serving: a well-formed message on a fresh connection, through the real client.
        assert server.running
        assert MllpClient().send(HOST, server.port, ADT, timeout=5.0) == b"ACK:" + ADT.encode()
        wait_for(lambda: server.active_connections == 0, timeout=10.0)
    elapsed = time.monotonic() - started
    print(f"\nMLLP fuzz: {FUZZ_CASES} cases in {elapsed:.1f} s, seed {FUZZ_SEED}: {outcomes}")
    assert outcomes["answered"] > FUZZ_CASES // 4 and outcomes["closed"] > 10
    assert not [t for t in threading.enumerate() if t.name.startswith("MllpConnection")]
