"""Raw DICOM Upper Layer (PS3.8) encoding, deterministic mutators and a strict dataset oracle
for ``test_fuzz.py``.

Everything here is hand-encoded on purpose: the fuzzer must be able to send bytes no DICOM
library would produce. Nothing here talks to anything but the socket it is given.
"""

from __future__ import annotations

import random
import socket
import struct
import time
import warnings
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.filereader import read_dataset

# ---------------------------------------------------------------------------------- constants

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.7433.1.1"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
VERIFICATION = "1.2.840.10008.1.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
PDU_NAMES = {1: "associate-rq", 2: "associate-ac", 3: "associate-rj", 4: "p-data", 5: "release-rq", 6: "release-rp", 7: "abort"}

#: Explicit VR with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UR", b"UT", b"UN", b"SV", b"UV"}
KNOWN_VRS = LONG_VRS | {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FL",
    b"FD",
    b"IS",
    b"LO",
    b"LT",
    b"PN",
    b"SH",
    b"SL",
    b"SS",
    b"ST",
    b"TM",
    b"UI",
    b"UL",
    b"US",
}
PIXEL_DATA = 0x7FE00010
ITEM, ITEM_DELIM, SEQ_DELIM = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF

# ---------------------------------------------------------------------------------- encoding


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


@dataclass(frozen=True)
class Context:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


def associate_rq(calling: str, called: str, contexts: list[Context], max_pdu: int = 65536) -> bytes:
    """A-ASSOCIATE-RQ per PS3.8 9.3.2."""
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for ctx in contexts:
        sub = _item(0x30, ctx.abstract_syntax.encode()) + b"".join(_item(0x40, ts.encode()) for ts in ctx.transfer_syntaxes)
        body += _item(0x20, bytes([ctx.context_id, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPLEMENTATION_CLASS_UID.encode()) + _item(0x55, b"PNEUMO_FUZZ")
    body += _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, bytes(4))


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">I", len(data) + 2) + bytes([context_id, control]) + data


def p_data(*pdvs: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(pdvs))


def _elem(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def c_store_rq(message_id: int, sop_class: str, sop_instance: str, *, dataset_type: int = 0x0000, command: int = 0x0001) -> bytes:
    """C-STORE-RQ command set, Implicit VR Little Endian (PS3.7 9.3.1.1, E.1)."""
    rest = (
        _elem(0, 0x0002, _ui(sop_class))
        + _elem(0, 0x0100, struct.pack("<H", command))
        + _elem(0, 0x0110, struct.pack("<H", message_id))
        + _elem(0, 0x0700, struct.pack("<H", 0))
        + _elem(0, 0x0800, struct.pack("<H", dataset_type))
        + _elem(0, 0x1000, _ui(sop_instance))
    )
    return _elem(0, 0x0000, struct.pack("<I", len(rest))) + rest


def parse_command(data: bytes) -> dict[int, bytes]:
    """Implicit VR LE command set -> {element number: raw value} (group 0000 only)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or pos + length > len(data):
            raise ValueError("malformed command set")
        out[element] = data[pos : pos + length]
        pos += length
    return out


# ---------------------------------------------------------------------------------- client


class Hang(Exception):
    """The server neither answered nor closed within the case's limit."""


@dataclass
class Answer:
    kind: str  # associate-ac, associate-rj, abort, release-rp, p-data, closed, pdu-XX
    body: bytes = b""


class Peer:
    """One raw TCP connection to the server, every read bounded by *limit* seconds."""

    def __init__(self, port: int, limit: float) -> None:
        self.limit = limit
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=limit)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer_closed = False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> bool:
        """False when the server already closed its side (an acceptable answer to garbage)."""
        self.sock.settimeout(self.limit)
        try:
            self.sock.sendall(data)
            return True
        except TimeoutError as exc:
            raise Hang("send blocked: the server stopped reading without closing") from exc
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            return False

    def half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _read_exact(self, n: int, deadline: float) -> bytes | None:
        chunks: list[bytes] = []
        remaining = n
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hang(f"no complete PDU within {self.limit:.0f} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(remaining, 1 << 20))
            except TimeoutError as exc:
                raise Hang(f"no answer within {self.limit:.0f} s") from exc
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
                return None
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def read(self) -> Answer:
        """The next PDU the server sends, or ``closed``; raises :class:`Hang`."""
        deadline = time.monotonic() + self.limit
        header = self._read_exact(6, deadline)
        if header is None:
            self.peer_closed = True
            return Answer("closed")
        pdu_type, _, length = struct.unpack(">BBI", header)
        if length > 64 << 20:
            return Answer(f"pdu-{pdu_type:02x}-oversized")
        body = self._read_exact(length, deadline) if length else b""
        if body is None:
            self.peer_closed = True
            return Answer("closed")
        return Answer(PDU_NAMES.get(pdu_type, f"pdu-{pdu_type:02x}"), body)


@dataclass
class Accepted:
    max_pdu: int
    contexts: dict[int, tuple[int, str]]  # id -> (result, transfer syntax)


def parse_ac(body: bytes) -> Accepted:
    pos = 68
    max_pdu = 0
    contexts: dict[int, tuple[int, str]] = {}
    while pos + 4 <= len(body):
        item_type, _, length = struct.unpack_from(">BBH", body, pos)
        payload = body[pos + 4 : pos + 4 + length]
        if item_type == 0x21:
            ts = ""
            if len(payload) > 8 and payload[4] == 0x40:
                ts = payload[8 : 8 + struct.unpack_from(">H", payload, 6)[0]].decode("ascii", "replace").rstrip("\0")
            contexts[payload[0]] = (payload[2], ts)
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= len(payload):
                sub_type, _, sub_len = struct.unpack_from(">BBH", payload, sub)
                if sub_type == 0x51 and sub_len == 4:
                    max_pdu = struct.unpack_from(">I", payload, sub + 4)[0]
                sub += 4 + sub_len
        pos += 4 + length
    return Accepted(max_pdu, contexts)


def read_dimse_response(peer: Peer) -> Answer | tuple[str, dict[int, bytes]]:
    """Read P-DATA-TF until a whole command set arrived; any other PDU (or close) is returned."""
    command = b""
    while True:
        answer = peer.read()
        if answer.kind != "p-data":
            return answer
        pos = 0
        body = answer.body
        while pos + 6 <= len(body):
            length = struct.unpack_from(">I", body, pos)[0]
            control = body[pos + 5]
            data = body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if control & 0x01:
                command += data
                if control & 0x02:
                    try:
                        return "command", parse_command(command)
                    except ValueError:
                        return Answer("p-data-malformed")


def fragments(data: bytes, context_id: int, max_pdu: int) -> list[bytes]:
    """Dataset *data* as P-DATA-TF PDUs that fit the acceptor's maximum PDU length."""
    size = (max_pdu or (1 << 20)) - 6
    if not data:
        return [p_data(pdv(context_id, 0x02, b""))]
    out = []
    for start in range(0, len(data), size):
        chunk = data[start : start + size]
        last = 0x02 if start + size >= len(data) else 0x00
        out.append(p_data(pdv(context_id, last, chunk)))
    return out


# ---------------------------------------------------------------------------------- dataset walking


class Defect(Exception):
    """The byte stream is not a parseable Explicit VR Little Endian dataset."""


@dataclass(frozen=True)
class Element:
    tag: int
    vr: bytes
    offset: int  # of the element's header
    header: int  # header length (8 or 12)
    length: int  # declared value length

    @property
    def value_offset(self) -> int:
        return self.offset + self.header

    @property
    def length_offset(self) -> int:
        return self.offset + (8 if self.header == 12 else 6)


class Disorder(Defect):
    """Parseable, but not a conformant encoding (PS3.5 7.1: tags ascending, each once)."""


def _walk(buf: bytes, pos: int, end: int, *, in_item: bool, top: list[Element] | None, depth: int, strict: bool = True) -> int:
    if depth > 32:
        raise Defect("nesting too deep")
    previous = -1
    while pos < end:
        if end - pos < 8:
            raise Defect("truncated element header")
        group, number = struct.unpack_from("<HH", buf, pos)
        tag = group << 16 | number
        if tag == ITEM_DELIM:
            if not in_item:
                raise Defect("item delimiter outside an item")
            return pos + 8
        if group == 0xFFFE:
            raise Defect(f"unexpected delimiter tag {tag:08X}")
        if tag <= previous and strict:
            raise Disorder(f"tag {tag:08X} out of order or repeated")
        previous = tag
        vr = buf[pos + 4 : pos + 6]
        if vr not in KNOWN_VRS:
            raise Defect(f"unknown VR {vr!r} at {tag:08X}")
        if vr in LONG_VRS:
            if end - pos < 12:
                raise Defect("truncated element header")
            length, header = struct.unpack_from("<I", buf, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", buf, pos + 6)[0], 8
        if top is not None:
            top.append(Element(tag, vr, pos, header, length))
        pos += header
        if length == UNDEFINED:
            if vr == b"SQ" or (vr == b"UN"):
                pos = _walk_sequence(buf, pos, end, None, depth, strict)
            elif tag == PIXEL_DATA and vr in (b"OB", b"OW"):
                pos = _walk_fragments(buf, pos, end)
            else:
                raise Defect(f"undefined length on {vr.decode(errors='replace')} {tag:08X}")
            continue
        if pos + length > end:
            raise Defect(f"value of {tag:08X} overruns the data ({length} > {end - pos})")
        if vr == b"SQ":
            if _walk_sequence(buf, pos, pos + length, pos + length, depth, strict) != pos + length:
                raise Defect(f"sequence {tag:08X} length mismatch")
        pos += length
    if in_item:
        raise Defect("item never closed")
    return pos


def _walk_sequence(buf: bytes, pos: int, end: int, defined_end: int | None, depth: int, strict: bool) -> int:
    while True:
        if defined_end is not None and pos == defined_end:
            return pos
        if end - pos < 8:
            raise Defect("sequence never closed" if defined_end is None else "truncated sequence")
        tag = struct.unpack_from("<HH", buf, pos)
        tag_value = tag[0] << 16 | tag[1]
        length = struct.unpack_from("<I", buf, pos + 4)[0]
        pos += 8
        if tag_value == SEQ_DELIM:
            if defined_end is not None:
                raise Defect("sequence delimiter in a defined-length sequence")
            return pos
        if tag_value != ITEM:
            raise Defect(f"expected an item, found {tag_value:08X}")
        if length == UNDEFINED:
            pos = _walk(buf, pos, end, in_item=True, top=None, depth=depth + 1, strict=strict)
        else:
            if pos + length > end:
                raise Defect("item overruns its sequence")
            if _walk(buf, pos, pos + length, in_item=False, top=None, depth=depth + 1, strict=strict) != pos + length:
                raise Defect("item length mismatch")
            pos += length


def _walk_fragments(buf: bytes, pos: int, end: int) -> int:
    while True:
        if end - pos < 8:
            raise Defect("encapsulated pixel data never closed")
        group, number, length = struct.unpack_from("<HHI", buf, pos)
        tag = group << 16 | number
        pos += 8
        if tag == SEQ_DELIM:
            return pos
        if tag != ITEM or length == UNDEFINED or pos + length > end:
            raise Defect("bad pixel data fragment")
        pos += length


def elements(data: bytes) -> list[Element]:
    """Top-level elements of a well-formed Explicit VR LE dataset (raises :class:`Defect`)."""
    top: list[Element] = []
    _walk(data, 0, len(data), in_item=False, top=top, depth=0)
    return top


UNPARSEABLE, NONCONFORMANT = "unparseable", "nonconformant"


def defect(data: bytes, sop_class: str, sop_instance: str) -> tuple[str, str] | None:
    """``(severity, reason)`` when *data* is not a sound dataset for this C-STORE-RQ, else None.

    ``unparseable`` — the SCP must not answer Success: a length that overruns the data, a
    truncated header, an unknown VR (the header size depends on it), a sequence or item never
    closed, broken encapsulation, or identifiers that differ from the request / are missing.
    ``nonconformant`` — parseable but not a valid encoding (tags out of order or repeated):
    reported, not asserted. Pixel values that do not match Rows/Columns are neither: that is a
    decode failure, which architecture §3 step 3 turns into a stored ``failed`` verdict.
    """
    if not data:
        return UNPARSEABLE, "empty dataset"
    try:
        _walk(data, 0, len(data), in_item=False, top=None, depth=0, strict=False)
    except Defect as exc:
        return UNPARSEABLE, str(exc)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(
                BytesIO(data), is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, vr, length: tag == PIXEL_DATA
            )
            found_class = str(ds.get("SOPClassUID", "") or "")
            found_instance = str(ds.get("SOPInstanceUID", "") or "")
            study = str(ds.get("StudyInstanceUID", "") or "")
            series = str(ds.get("SeriesInstanceUID", "") or "")
    except Exception as exc:  # noqa: BLE001 - any decode problem is a defect
        return UNPARSEABLE, f"header does not decode: {exc.__class__.__name__}"
    if found_class != sop_class:
        return UNPARSEABLE, "SOP Class UID differs from the request"
    if found_instance != sop_instance:
        return UNPARSEABLE, "SOP Instance UID differs from the request"
    if not study or not series:
        return UNPARSEABLE, "Study/Series Instance UID missing"
    try:
        elements(data)
    except Defect as exc:
        return NONCONFORMANT, str(exc)
    return None


# ---------------------------------------------------------------------------------- mutators


@dataclass
class Mutation:
    name: str
    data: bytes
    detail: str = ""
    complete: bool = True  # the PDU framing delivers every byte it declares

    def describe(self) -> str:
        return f"{self.name}{': ' + self.detail if self.detail else ''}"


_CT_SUB_ITEMS = _item(0x30, b"1.2.840.10008.5.1.4.1.1.2") + _item(0x40, EXPLICIT_VR_LE.encode())


def _declared_complete(data: bytes) -> bool:
    return len(data) >= 6 and struct.unpack_from(">I", data, 2)[0] == len(data) - 6


def _fix_length(data: bytes) -> bytes:
    return data[:2] + struct.pack(">I", len(data) - 6) + data[6:] if len(data) >= 6 else data


def _items(data: bytes, start: int = 74) -> list[tuple[int, int, int]]:
    """(offset, type, length) of the variable items of an A-ASSOCIATE PDU (best effort)."""
    out = []
    pos = start
    while pos + 4 <= len(data):
        item_type, _, length = struct.unpack_from(">BBH", data, pos)
        out.append((pos, item_type, length))
        pos += 4 + length
    return out


def _flip_bits(rng: random.Random, data: bytes, start: int, end: int, count: int) -> tuple[bytes, list[int]]:
    buf = bytearray(data)
    spots = []
    for _ in range(count):
        pos = rng.randrange(start, end)
        buf[pos] ^= 1 << rng.randrange(8)
        spots.append(pos)
    return bytes(buf), spots


def mutate_associate(rng: random.Random, valid: bytes) -> Mutation:
    """One random malformation of a valid A-ASSOCIATE-RQ."""
    kind = rng.choice(
        [
            "bitflip",
            "bitflip",
            "truncate",
            "truncate-fixed",
            "pdu-length",
            "huge-length",
            "pdu-type",
            "item-length",
            "garbage-item",
            "field",
            "random-bytes",
            "splice",
            "contexts",
            "sub-item",
        ]
    )
    items = _items(valid)
    if kind == "bitflip":
        count = rng.choice([1, 1, 2, 4, 8, 32])
        data, spots = _flip_bits(rng, valid, 0, len(valid), count)
        detail = f"{count} bit(s) at {spots[:4]}"
    elif kind == "truncate":
        cut = rng.randrange(0, len(valid))
        data, detail = valid[:cut], f"first {cut} of {len(valid)} bytes"
    elif kind == "truncate-fixed":
        cut = rng.randrange(6, len(valid))
        data, detail = _fix_length(valid[:cut]), f"cut at {cut}, PDU length fixed"
    elif kind == "pdu-length":
        value = rng.choice([0, 1, 4, 67, 68, len(valid) - 7, len(valid) - 5, len(valid) + 10, rng.randrange(0, 2 * len(valid))])
        value = max(0, value)
        data, detail = valid[:2] + struct.pack(">I", value) + valid[6:], f"length {value} for {len(valid) - 6} bytes"
    elif kind == "huge-length":
        value = rng.choice([0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, 0x10000000, 1 << 24])
        data, detail = valid[:2] + struct.pack(">I", value) + valid[6:], f"length 0x{value:08X}"
    elif kind == "pdu-type":
        value = rng.choice([0x00, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x10, 0x20, 0x50, 0x81, 0xFF, rng.randrange(256)])
        data, detail = bytes([value]) + valid[1:], f"type 0x{value:02X}"
    elif kind == "item-length":
        offset, item_type, length = rng.choice(items)
        value = rng.choice([0, 1, 2, length - 1, length + 1, length + 100, 0xFFFF])
        data = valid[: offset + 2] + struct.pack(">H", value & 0xFFFF) + valid[offset + 4 :]
        detail = f"item 0x{item_type:02X} length {length} -> {value & 0xFFFF}"
    elif kind == "garbage-item":
        offset = rng.choice([*(o for o, _, _ in items), len(valid)])
        item_type = rng.choice([0x00, 0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x54, 0x56, 0x7F, 0xFF, rng.randrange(256)])
        payload = rng.randbytes(rng.choice([0, 1, 3, 16, 300, 5000]))
        declared = rng.choice([len(payload), len(payload), rng.randrange(0, 0x10000)])
        garbage = struct.pack(">BBH", item_type, rng.randrange(256), declared) + payload
        data = _fix_length(valid[:offset] + garbage + valid[offset:])
        detail = f"item 0x{item_type:02X} ({len(payload)} bytes, declared {declared}) at {offset}"
    elif kind == "field":
        which = rng.choice(["version", "called", "calling", "reserved", "app-context"])
        buf = bytearray(valid)
        if which == "version":
            buf[6:8] = struct.pack(">H", rng.choice([0, 2, 0xFFFF]))
        elif which == "called":
            buf[10:26] = rng.choice([bytes(16), b" " * 16, rng.randbytes(16), b"\xff" * 16])
        elif which == "calling":
            buf[26:42] = rng.choice([bytes(16), b" " * 16, rng.randbytes(16), b"NOTAPEER".ljust(16), b"\\STORESCU\\".ljust(16)])
        elif which == "reserved":
            buf[42:74] = rng.randbytes(32)
        else:
            offset, _, length = items[0]
            buf[offset + 4 : offset + 4 + length] = rng.randbytes(length)
        data, detail = bytes(buf), which
    elif kind == "random-bytes":
        size = rng.choice([1, 5, 6, 7, 64, 500, 4000])
        head = rng.choice([b"", bytes([1, 0]), bytes([4, 0])])
        data, detail = head + rng.randbytes(size), f"{len(head) + size} random bytes"
    elif kind == "splice":
        offset, _, length = rng.choice(items)
        chunk = valid[offset : offset + 4 + length]
        copies = rng.choice([2, 3, 50])
        data = _fix_length(valid[:offset] + chunk * copies + valid[offset + 4 + length :])
        detail = f"item at {offset} repeated {copies}x"
    elif kind == "contexts":
        variant = rng.choice(["none", "even-id", "many", "empty-ts", "empty-abstract", "long-uid"])
        body = bytearray(valid[6:74])
        tail = b"".join(valid[o : o + 4 + n] for o, t, n in items if t != 0x20)
        if variant == "none":
            contexts = b""
        elif variant == "even-id":
            contexts = _item(0x20, bytes([2, 0, 0, 0]) + _CT_SUB_ITEMS)
        elif variant == "many":
            contexts = b"".join(_item(0x20, bytes([(2 * i + 1) & 0xFF, 0, 0, 0]) + _CT_SUB_ITEMS) for i in range(200))
        elif variant == "empty-ts":
            contexts = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.5.1.4.1.1.2"))
        elif variant == "empty-abstract":
            contexts = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"") + _item(0x40, EXPLICIT_VR_LE.encode()))
        else:
            contexts = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1." * 4000) + _item(0x40, EXPLICIT_VR_LE.encode()))
        app = valid[items[0][0] : items[0][0] + 4 + items[0][2]]
        data = pdu(A_ASSOCIATE_RQ, bytes(body) + app + contexts + tail[len(app) :])
        detail = variant
    else:  # sub-item: break the user information item
        user = [i for i in items if i[1] == 0x50][0]
        offset, _, length = user
        variant = rng.choice(["max-pdu-0", "max-pdu-short", "sub-overrun", "async-ops", "role-garbage", "empty-impl"])
        subs = {
            "max-pdu-0": _item(0x51, struct.pack(">I", 0)),
            "max-pdu-short": _item(0x51, b"\x01"),
            "sub-overrun": struct.pack(">BBH", 0x52, 0, 0xFFF0) + b"1.2.3",
            "async-ops": _item(0x53, struct.pack(">HH", 0xFFFF, 0xFFFF)),
            "role-garbage": _item(0x54, struct.pack(">H", 0xFFFF) + b"1.2" + b"\x07\x07"),
            "empty-impl": _item(0x52, b""),
        }
        new_user = _item(0x50, subs[variant] + valid[offset + 4 : offset + 4 + length])
        data = _fix_length(valid[:offset] + new_user + valid[offset + 4 + length :])
        detail = variant
    return Mutation(f"associate/{kind}", data, detail, complete=_declared_complete(data))


def mutate_pdata(
    rng: random.Random, context_id: int, sop_class: str, sop_instance: str, dataset: bytes, max_pdu: int
) -> Mutation:
    """A malformed P-DATA-TF stream on an established association."""
    command = c_store_rq(7, sop_class, sop_instance)
    kind = rng.choice(
        [
            "unknown-context",
            "command-flip",
            "command-truncated",
            "command-group-length",
            "data-first",
            "pdv-overrun",
            "pdv-zero",
            "control-bits",
            "no-dataset-flag",
            "unknown-command",
            "second-associate",
            "pdata-garbage",
            "command-only",
        ]
    )
    complete = True
    detail = ""
    if kind == "unknown-context":
        bad = rng.choice([0, 2, 3, 99, 255])
        data = p_data(pdv(bad, 0x03, command)) + b"".join(fragments(dataset, bad, max_pdu))
        detail = f"context {bad}"
    elif kind == "command-flip":
        flipped, spots = _flip_bits(rng, command, 0, len(command), rng.choice([1, 2, 8]))
        data = p_data(pdv(context_id, 0x03, flipped)) + b"".join(fragments(dataset, context_id, max_pdu))
        detail = f"bits at {spots[:4]}"
    elif kind == "command-truncated":
        cut = rng.randrange(0, len(command))
        data = p_data(pdv(context_id, 0x03, command[:cut])) + b"".join(fragments(dataset, context_id, max_pdu))
        detail = f"{cut} of {len(command)} bytes"
    elif kind == "command-group-length":
        value = rng.choice([0, 1, 0xFFFFFFFF, len(command) * 3])
        bad = command[:8] + struct.pack("<I", value) + command[12:]
        data = p_data(pdv(context_id, 0x03, bad)) + b"".join(fragments(dataset, context_id, max_pdu))
        detail = f"group length {value}"
    elif kind == "data-first":
        data = b"".join(fragments(dataset[:4096], context_id, max_pdu)) + p_data(pdv(context_id, 0x03, command))
        complete = False  # the command announces a dataset that never follows
        detail = "4 KiB of data before the command"
    elif kind == "pdv-overrun":
        body = struct.pack(">I", 0xFFFF) + bytes([context_id, 0x03]) + command
        data, complete = pdu(P_DATA_TF, body), True
        detail = "PDV item length past its PDU"
    elif kind == "pdv-zero":
        data = pdu(P_DATA_TF, struct.pack(">I", rng.choice([0, 1])) + bytes([context_id]))
        detail = "PDV item length 0/1"
    elif kind == "control-bits":
        value = rng.choice([0x04, 0x07, 0xFF, 0x01])
        data = p_data(pdv(context_id, value, command))
        complete = bool(value & 0x02)
        detail = f"message control header 0x{value:02X}"
    elif kind == "no-dataset-flag":
        data = p_data(pdv(context_id, 0x03, c_store_rq(7, sop_class, sop_instance, dataset_type=0x0101)))
        detail = "C-STORE-RQ says no dataset"
    elif kind == "unknown-command":
        value = rng.choice([0x0FFF, 0x8001, 0x0000, 0xFFFF])
        data = p_data(pdv(context_id, 0x03, c_store_rq(7, sop_class, sop_instance, command=value, dataset_type=0x0101)))
        detail = f"command field 0x{value:04X}"
    elif kind == "second-associate":
        data = associate_rq("STORESCU", "PNEUMO", [Context(1, sop_class, (EXPLICIT_VR_LE,))])
    elif kind == "pdata-garbage":
        data = pdu(P_DATA_TF, rng.randbytes(rng.choice([1, 6, 100, 3000])))
    else:  # command-only: dataset announced, never sent — the server must give up by itself
        data = p_data(pdv(context_id, 0x03, command))
        complete = False
        detail = "dataset announced, never sent"
    return Mutation(f"pdata/{kind}", data, detail, complete=complete)


@dataclass
class DatasetTemplate:
    """A real dataset (Explicit VR LE, no file meta) and where its UIDs sit."""

    name: str
    data: bytes
    sop_class: str
    uids: tuple[str, str, str]  # study, series, sop instance (all the same length)
    table: list[Element] = field(default_factory=list)

    def with_uids(self, new: tuple[str, str, str]) -> bytes:
        out = self.data
        for old, replacement in zip(self.uids, new, strict=True):
            assert len(old) == len(replacement)
            assert out.count(old.encode()) == 1
            out = out.replace(old.encode(), replacement.encode())
        return out


def _insert_at_tag(table: list[Element], data: bytes, tag: int, payload: bytes) -> bytes:
    offset = next((e.offset for e in table if e.tag > tag), len(data))
    return data[:offset] + payload + data[offset:]


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    group, number = tag >> 16, tag & 0xFFFF
    if vr in LONG_VRS:
        return struct.pack("<HH", group, number) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, number) + vr + struct.pack("<H", len(value)) + value


def mutate_dataset(rng: random.Random, template: DatasetTemplate, data: bytes) -> Mutation:
    """One malformation of a real dataset (UIDs already replaced: offsets unchanged)."""
    table = template.table
    pixel = next(e for e in table if e.tag == PIXEL_DATA)
    header_end = pixel.offset
    kind = rng.choice(
        [
            "valid",
            "truncate",
            "truncate",
            "element-length",
            "element-length",
            "open-sequence",
            "open-sequence",
            "pixel-length",
            "header-flips",
            "header-flips",
            "header-flips",
            "pixel-flips",
            "vr-corrupt",
            "tag-order",
            "duplicate",
            "garbage-tail",
            "tiny",
            "uid-mismatch",
        ]
    )
    detail = ""
    if kind == "valid":
        out = data
    elif kind == "truncate":
        cut = rng.choice([rng.randrange(0, header_end), rng.randrange(header_end, len(data)), pixel.value_offset, header_end])
        out, detail = data[:cut], f"{cut} of {len(data)} bytes"
    elif kind == "element-length":
        element = rng.choice(table)
        if element.header == 12:
            shorter = element.length - 2 if element.length >= 2 else 3
            value = rng.choice([0, 1, element.length + 2, shorter, 0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, len(data)])
            packed = struct.pack("<I", value & 0xFFFFFFFF)
        else:
            value = rng.choice([0, 1, element.length + 2, element.length + 1, 0xFFFF, 0x8000, max(0, element.length - 2)])
            packed = struct.pack("<H", value & 0xFFFF)
        at = element.length_offset
        out = data[:at] + packed + data[at + len(packed) :]
        detail = f"{element.tag:08X} {element.vr.decode()} length {element.length} -> {value}"
    elif kind == "open-sequence":
        tag, where = rng.choice(
            [(0x00081140, "referenced image"), (0x00400275, "request attributes"), (0xFFFAFFFA, "after pixel data")]
        )
        item_body = _explicit(0x00081150, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0")
        item_body += rng.choice([b"", _explicit(0x00081155, b"UI", b"1.2.3.4")])
        item = struct.pack("<HHI", 0xFFFE, 0xE000, rng.choice([UNDEFINED, len(item_body)])) + item_body
        sequence = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\0\0" + struct.pack("<I", UNDEFINED)
        sequence += item * rng.choice([1, 2])
        out = _insert_at_tag(table, data, tag, sequence)
        detail = f"undefined-length SQ {tag:08X} ({where}) never closed"
    elif kind == "pixel-length":
        value = rng.choice([0xFFFFFFF0, 0xFFFFFFF0, 0xFFFFFFFF, 0xFFFFFFFE, pixel.length + 2, 0x7FFFFFFF])
        at = pixel.length_offset
        out = data[:at] + struct.pack("<I", value) + data[at + 4 :]
        detail = f"Pixel Data length 0x{value:08X} (real {pixel.length})"
    elif kind == "header-flips":
        count = rng.choice([1, 1, 2, 4, 16])
        out, spots = _flip_bits(rng, data, 0, header_end, count)
        detail = f"{count} bit(s) at {spots[:4]}"
    elif kind == "pixel-flips":
        out, spots = _flip_bits(rng, data, pixel.value_offset, len(data), 8)
        detail = "8 bits in pixel values"
    elif kind == "vr-corrupt":
        element = rng.choice(table)
        vr = rng.choice([b"SQ", b"UN", b"OB", b"XX", b"\0\0", b"ox", b"US", b"UL"])
        out = data[: element.offset + 4] + vr + data[element.offset + 6 :]
        detail = f"{element.tag:08X} VR {element.vr.decode()} -> {vr!r}"
    elif kind == "tag-order":
        i = rng.randrange(0, len(table) - 2)
        a, b = table[i], table[i + 1]
        end_b = b.value_offset + b.length
        out = data[: a.offset] + data[b.offset : end_b] + data[a.offset : b.offset] + data[end_b:]
        detail = f"{a.tag:08X} and {b.tag:08X} swapped"
    elif kind == "duplicate":
        element = rng.choice([e for e in table if e.tag != PIXEL_DATA])
        chunk = data[element.offset : element.value_offset + element.length]
        out = data[: element.offset] + chunk + data[element.offset :]
        detail = f"{element.tag:08X} twice"
    elif kind == "garbage-tail":
        out = data + rng.randbytes(rng.choice([1, 7, 8, 100]))
        detail = "random bytes after Pixel Data"
    elif kind == "tiny":
        out = rng.choice([b"", b"\x08\x00", rng.randbytes(9), data[:12]])
        detail = f"{len(out)} bytes"
    else:  # uid-mismatch: dataset fine, request claims another instance (handled by the caller)
        out = data
        detail = "request names another SOP Instance UID"
    return Mutation(f"dataset/{kind}", out, detail)
