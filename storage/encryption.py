"""Encryption at rest of stored DICOM files: AES-256-GCM in a chunked, authenticated stream.

Why this shape (docs/architecture.md, "Encryption at rest"):

* **AES-256-GCM** (NIST SP 800-38D) through ``cryptography``'s ``AESGCM``: an AEAD, so every
  read is an *authenticated* decryption — a flipped bit, a wrong key or a spliced file fails
  with :class:`StoredFileIntegrityError` instead of yielding wrong pixels.
* **Chunks** (the "STREAM" construction of Hoang, Reyhanitabar, Rogaway and Vizár, "Online
  Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015; the layout of
  Tink's ``AesGcmHkdfStreaming``): the plaintext is cut into ``chunk_size`` pieces, each sealed
  on its own with nonce ``prefix(7) || counter(4, big-endian) || last(1)``. A multi-frame file of
  a gigabyte is then encrypted and decrypted with one chunk of working memory, never held twice,
  and the counter and the last-chunk flag in the nonce make reordering, dropping, truncating or
  appending chunks fail authentication.
* **A per-file key**: ``HKDF-SHA256(master key, salt = 16 random bytes, info = format and key
  id)`` (RFC 5869). GCM's 96-bit nonce must never repeat under one key; deriving a fresh key per
  file removes any birthday bound on the number of files (a random 7-byte prefix alone would
  reach a 1e-3 collision chance near ten million files).
* **The header is associated data of every chunk**: magic, format version, chunk size, key id,
  salt and nonce prefix cannot be edited without every chunk failing.
* **A key id in the header** selects the key from the :class:`Keyring` on read, so new writes use
  the current key while files under retired keys stay readable until ``pneumo keys rotate``
  re-encrypts them. A file that does not start with :data:`MAGIC` is plaintext (a store that was
  encrypted later; a DICOM file starts with a 128-byte preamble and ``DICM``).

File layout (format version 1)::

    magic "\\x89PNEUMO\\n" (8) | version 0x01 (1) | log2(chunk size) (1) | len(key id) (1) |
    key id (ASCII, 1-64) | salt (16) | nonce prefix (7) |
    chunk 0 ciphertext + 16-byte tag | chunk 1 ... | last chunk (<= chunk size, may be empty)

Every chunk but the last holds exactly ``chunk_size`` plaintext bytes; the last holds the rest
(``1..chunk_size`` bytes, or 0 for an empty file), so the plaintext size follows from the file
size (:func:`plaintext_size`).

What the index's ``sha256`` and ``size`` mean: the hash and size of the *plaintext* DICOM bytes,
so an instance keeps its identity (duplicate detection, conflicts, reindex) whether it is stored
encrypted or not, and across key rotations.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from conf.errors import PneumoError

MAGIC = b"\x89PNEUMO\n"
FORMAT_VERSION = 1
#: 64 KiB: small enough that one chunk of working memory is nothing, large enough that the
#: per-chunk call and the 16-byte tag cost nothing measurable (0.02 % size overhead).
DEFAULT_CHUNK_LOG2 = 16
KEY_BYTES = 32
TAG_BYTES = 16
SALT_BYTES = 16
PREFIX_BYTES = 7
_FIXED = struct.Struct(">8sBBB")  # magic, version, log2 chunk size, key id length
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HKDF_INFO = b"pneumo-filestore v1 "


class StoredFileIntegrityError(PneumoError):
    """A stored file failed authenticated decryption (tampered, truncated, spliced, or read with
    the wrong key) or names a key this process does not hold.

    Its own kind, not retryable: the same bytes fail again. Boundaries: a C-GET/C-MOVE
    sub-operation fails (the instance is counted as failed), a delivery is rejected (dead
    letter), an inference job is dead-lettered, the FHIR API answers 500. Never are any of the
    file's bytes returned."""


class UnknownKeyError(StoredFileIntegrityError):
    """The file is encrypted under a key id that is neither current nor retired here."""


def valid_key_id(value: str) -> str:
    """Key ids are 1-64 of ``A-Z a-z 0-9 . _ -``: they are written into every file header and logged."""
    if not _KEY_ID.fullmatch(value):
        raise ValueError(f"not a valid key id (1-64 of A-Z a-z 0-9 . _ -): {value!r}")
    return value


@dataclass(frozen=True)
class Keyring:
    """The current key (every new write) and the retired keys (read only), by key id."""

    current_id: str
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        valid_key_id(self.current_id)
        if self.current_id not in self.keys:
            raise ValueError(f"the keyring lacks its current key {self.current_id!r}")
        for key_id, key in self.keys.items():
            valid_key_id(key_id)
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES}")

    def key(self, key_id: str) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise UnknownKeyError(
                f"the stored file is encrypted under key id {key_id!r}, which is not configured "
                "(add it to storage.encryption.retired_key_files)"
            ) from None


@dataclass(frozen=True)
class Header:
    key_id: str
    chunk_size: int
    salt: bytes
    prefix: bytes
    raw: bytes  # the exact header bytes: associated data of every chunk


def _file_key(master: bytes, header: Header) -> AESGCM:
    derived = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=header.salt, info=_HKDF_INFO + header.key_id.encode("ascii")
    ).derive(master)
    return AESGCM(derived)


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter >= 2**32:
        raise StoredFileIntegrityError("the stored file has more chunks than the format allows")
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def new_header(keyring: Keyring, chunk_log2: int = DEFAULT_CHUNK_LOG2) -> Header:
    key_id = keyring.current_id.encode("ascii")
    salt, prefix = os.urandom(SALT_BYTES), os.urandom(PREFIX_BYTES)
    raw = _FIXED.pack(MAGIC, FORMAT_VERSION, chunk_log2, len(key_id)) + key_id + salt + prefix
    return Header(keyring.current_id, 1 << chunk_log2, salt, prefix, raw)


def read_header(handle: BinaryIO) -> Header | None:
    """The header at *handle*'s position, or None (position restored) when the file is plaintext."""
    start = handle.tell()
    fixed = handle.read(_FIXED.size)
    if len(fixed) < _FIXED.size or not fixed.startswith(MAGIC):
        handle.seek(start)
        return None
    _, version, chunk_log2, id_length = _FIXED.unpack(fixed)
    if version != FORMAT_VERSION:
        raise StoredFileIntegrityError(f"the stored file uses encryption format version {version}, not {FORMAT_VERSION}")
    if not 12 <= chunk_log2 <= 24 or not 1 <= id_length <= 64:
        raise StoredFileIntegrityError("the stored file's encryption header is damaged")
    rest = handle.read(id_length + SALT_BYTES + PREFIX_BYTES)
    if len(rest) != id_length + SALT_BYTES + PREFIX_BYTES:
        raise StoredFileIntegrityError("the stored file's encryption header is truncated")
    try:
        key_id = valid_key_id(rest[:id_length].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise StoredFileIntegrityError("the stored file's encryption header is damaged") from None
    salt = rest[id_length : id_length + SALT_BYTES]
    prefix = rest[id_length + SALT_BYTES :]
    return Header(key_id, 1 << chunk_log2, salt, prefix, fixed + rest)


def plaintext_size(ciphertext_size: int, header: Header) -> int:
    """The plaintext size of a file of *ciphertext_size* bytes (see the layout above)."""
    body = ciphertext_size - len(header.raw)
    full = header.chunk_size + TAG_BYTES
    chunks = max(1, -(-body // full))
    last = body - (chunks - 1) * full - TAG_BYTES
    if body < TAG_BYTES or last < 0:
        raise StoredFileIntegrityError("the stored file is truncated")
    return (chunks - 1) * header.chunk_size + last


def _read_full(handle: BinaryIO, size: int) -> bytes:
    """*size* bytes, fewer only at end of file (a plain ``read`` may return less on pipes)."""
    data = handle.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size and (more := handle.read(size - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class EncryptingWriter:
    """Writes the encrypted form of what it is given to *dst*; :meth:`finish` seals the last chunk.

    The last chunk is only known at the end, so up to one chunk of plaintext is held back (an
    exact multiple of the chunk size ends with a full chunk flagged last, never an empty one).
    ``sha256`` and ``size`` describe the plaintext (the index's identity of the instance)."""

    def __init__(self, dst: BinaryIO, keyring: Keyring) -> None:
        self._dst = dst
        self.header = new_header(keyring)
        self._aead = _file_key(keyring.key(keyring.current_id), self.header)
        self._pending = bytearray()
        self._counter = 0
        self._hash = hashlib.sha256()
        self.size = 0
        dst.write(self.header.raw)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)
        self._pending += data
        chunk = self.header.chunk_size
        if len(self._pending) <= chunk:
            return
        cut = ((len(self._pending) - 1) // chunk) * chunk  # keep 1..chunk bytes back
        view = memoryview(self._pending)
        for start in range(0, cut, chunk):
            self._seal(view[start : start + chunk], last=False)
        view.release()
        del self._pending[:cut]

    def finish(self) -> str:
        """Seal the last chunk; returns the plaintext's SHA-256 (hex)."""
        self._seal(self._pending, last=True)
        self._pending = bytearray()
        return self._hash.hexdigest()

    def _seal(self, data: bytes | bytearray | memoryview, *, last: bool) -> None:
        nonce = _nonce(self.header.prefix, self._counter, last)
        self._dst.write(self._aead.encrypt(nonce, data, self.header.raw))  # buffers: no copy
        self._counter += 1


def encrypt_stream(src: BinaryIO, dst: BinaryIO, keyring: Keyring, *, block: int = 1 << 20) -> tuple[str, int]:
    """Encrypt all of *src* into *dst*; returns the plaintext's (SHA-256 hex, size)."""
    writer = EncryptingWriter(dst, keyring)
    while data := src.read(block):
        writer.write(data)
    return writer.finish(), writer.size


def decrypt_stream(src: BinaryIO, sink: Callable[[bytes], object], keyring: Keyring, header: Header | None = None) -> int:
    """Authenticate and decrypt the encrypted file at *src* chunk by chunk into *sink*.

    *header*: already read by the caller (then *src* is positioned after it). Each chunk is
    authenticated before it reaches *sink*; truncation, appended data, reordered chunks and a
    damaged header all raise :class:`StoredFileIntegrityError` — at the latest on the last chunk,
    so a caller that must not act on a partial file collects everything first (``FileStore.open``).
    Returns the plaintext size."""
    if header is None:
        header = read_header(src)
        if header is None:
            raise StoredFileIntegrityError("the stored file is not encrypted")
    aead = _file_key(keyring.key(header.key_id), header)
    full = header.chunk_size + TAG_BYTES
    counter, size = 0, 0
    current = _read_full(src, full)
    while True:
        following = _read_full(src, full) if len(current) == full else b""
        last = not following
        if len(current) < TAG_BYTES or (last and counter > 0 and len(current) == TAG_BYTES):
            raise StoredFileIntegrityError("the stored file is truncated")
        try:
            plain = aead.decrypt(_nonce(header.prefix, counter, last), current, header.raw)
        except InvalidTag:
            raise StoredFileIntegrityError(
                "the stored file failed authenticated decryption (AES-256-GCM): it was altered, truncated "
                f"or reordered, or key {header.key_id!r} is not the key it was written with"
            ) from None
        sink(plain)
        size += len(plain)
        if last:
            return size
        counter += 1
        current = following


def encrypt_bytes(data: bytes, keyring: Keyring) -> bytes:
    """The encrypted file for *data* (small objects: generated SRs, tests)."""
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, keyring)
    return out.getvalue()


def decode_key(material: bytes, where: str) -> bytes:
    """A 32-byte key from a key file's or variable's content: 64 hex digits (``openssl rand -hex
    32``) or base64 of 32 bytes (``openssl rand -base64 32``). Text only, on purpose: accepting 32
    raw bytes too would take a mistyped 32-character text (a 128-bit hex key, a password) for an
    AES-256 key of far less entropy. Errors name *where*, never the content."""
    text = material.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        decoded = base64.b64decode(text, validate=True)
        if len(decoded) == KEY_BYTES:
            return decoded
    except (binascii.Error, ValueError):
        pass
    raise ValueError(f"{where}: not an AES-256 key (64 hex digits or base64 of 32 bytes)")
