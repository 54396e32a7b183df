"""Encryption at rest of the file store (storage/encryption.py, FileStore.open/read_bytes/digest):
round trips, and every way of damaging a file or reading it with the wrong key fails loudly."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError

from conf.settings import StorageEncryptionSettings, StorageSettings
from storage.encryption import (
    MAGIC,
    TAG_BYTES,
    Keyring,
    StoredFileIntegrityError,
    UnknownKeyError,
    read_header,
)
from storage.filestore import FileStore, is_encrypted
from storage.keyring import EncryptionKeyError, generate_key_file, load_keyring
from tests.conftest import sample

CHUNK = 1 << 16
REL = "1.2.3/1.2.3.4/1.2.3.4.5.dcm"


def _keyring(current: str = "k1", **keys: bytes) -> Keyring:
    material = {current: hashlib.sha256(current.encode()).digest(), **keys}
    return Keyring(current, material)


def _store(tmp_path: Path, keyring: Keyring | None) -> FileStore:
    return FileStore(tmp_path / "dicom", tmp_path / "tmp", keyring=keyring)


def _put(store: FileStore, data: bytes, rel: str = REL) -> Path:
    store.commit(store.stage_bytes(data), rel)
    return store.absolute(rel)


def _header_length(path: Path) -> int:
    with path.open("rb") as handle:
        header = read_header(handle)
    assert header is not None
    return len(header.raw)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 12345])
def test_round_trip_every_chunk_boundary(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    store = _store(tmp_path, _keyring())
    stored = store.commit(store.stage_bytes(data), REL)
    assert stored.size == size and stored.sha256 == hashlib.sha256(data).hexdigest()  # the plaintext's identity
    assert is_encrypted(store.absolute(REL))
    assert store.read_bytes(REL) == data
    assert store.digest(REL) == (hashlib.sha256(data).hexdigest(), size)
    with store.open(REL) as handle:
        assert handle.read() == data
    chunks = max(1, -(-size // CHUNK))
    assert store.absolute(REL).stat().st_size == _header_length(store.absolute(REL)) + size + chunks * TAG_BYTES


def test_real_image_staged_from_a_received_file_is_encrypted_and_parses(tmp_path: Path) -> None:
    source = sample("RG1_UNCR.dcm")  # 7 MB, about 110 chunks
    plain = source.read_bytes()
    store = _store(tmp_path, _keyring())
    staged = store.stage_copy(source)
    staged.wait()
    stored = store.commit(staged, REL)
    on_disk = store.absolute(REL).read_bytes()
    assert on_disk.startswith(MAGIC) and b"DICM" not in on_disk[:4096]
    name = str(pydicom.dcmread(source, stop_before_pixels=True).PatientName).encode()
    assert name and name not in on_disk  # no PHI in the clear
    assert stored.sha256 == hashlib.sha256(plain).hexdigest() and stored.size == len(plain)
    with store.open(REL) as handle:
        ds = pydicom.dcmread(handle)
    assert ds.pixel_array.shape == pydicom.dcmread(source).pixel_array.shape
    assert list((tmp_path / "tmp").iterdir()) == []


def _damaged(tmp_path: Path, edit: object) -> FileStore:
    store = _store(tmp_path, _keyring())
    path = _put(store, os.urandom(3 * CHUNK + 100))
    raw = bytearray(path.read_bytes())
    assert callable(edit)
    path.write_bytes(bytes(edit(raw, _header_length(path))))
    return store


def _flip(offset_from_header: int):  # type: ignore[no-untyped-def]
    def edit(raw: bytearray, header: int) -> bytearray:
        raw[header + offset_from_header] ^= 0x01
        return raw
    return edit


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_flip(10), id="bit-in-first-chunk"),
        pytest.param(_flip(2 * (CHUNK + TAG_BYTES) + 5), id="bit-in-last-chunk"),
        pytest.param(_flip(CHUNK + TAG_BYTES - 1), id="bit-in-a-tag"),
        pytest.param(lambda raw, h: raw[: h + CHUNK + TAG_BYTES], id="truncated-at-chunk-boundary"),
        pytest.param(lambda raw, h: raw[: h + 2 * (CHUNK + TAG_BYTES)], id="last-chunk-dropped"),
        pytest.param(lambda raw, h: raw[:-1], id="truncated-by-one-byte"),
        pytest.param(lambda raw, h: raw[: h + 5], id="truncated-inside-first-chunk"),
        pytest.param(lambda raw, h: raw + b"\x00" * 40, id="bytes-appended"),
        pytest.param(
            lambda raw, h: raw[:h] + raw[h + CHUNK + TAG_BYTES : h + 2 * (CHUNK + TAG_BYTES)]
            + raw[h : h + CHUNK + TAG_BYTES] + raw[h + 2 * (CHUNK + TAG_BYTES) :],
            id="chunks-swapped",
        ),
        pytest.param(lambda raw, h: bytearray(raw[: h - 3]) + bytes([raw[h - 3] ^ 1]) + raw[h - 2 :], id="nonce-prefix-edited"),
        pytest.param(lambda raw, h: bytearray(raw[:20]) + bytes([raw[20] ^ 1]) + raw[21:], id="salt-edited"),
    ],
)
def test_any_damage_fails_authentication_and_no_byte_comes_out(tmp_path: Path, edit: object) -> None:
    store = _damaged(tmp_path, edit)
    with pytest.raises(StoredFileIntegrityError):
        store.read_bytes(REL)
    with pytest.raises(StoredFileIntegrityError):
        store.open(REL)
    with pytest.raises(StoredFileIntegrityError):
        store.digest(REL)


def test_chunks_of_two_files_cannot_be_spliced(tmp_path: Path) -> None:
    store = _store(tmp_path, _keyring())
    first = _put(store, os.urandom(2 * CHUNK + 10), "1.2/1.3/1.4.dcm")
    second = _put(store, os.urandom(2 * CHUNK + 10), "1.2/1.3/1.5.dcm")
    h = _header_length(first)
    spliced = first.read_bytes()[: h + CHUNK + TAG_BYTES] + second.read_bytes()[h + CHUNK + TAG_BYTES :]
    first.write_bytes(spliced)
    with pytest.raises(StoredFileIntegrityError):
        store.read_bytes("1.2/1.3/1.4.dcm")


def test_wrong_key_unknown_key_and_no_key(tmp_path: Path) -> None:
    data = b"DICM" + os.urandom(1000)
    _put(_store(tmp_path, _keyring("k1")), data)
    impostor = Keyring("k1", {"k1": os.urandom(32)})  # same id, other key
    with pytest.raises(StoredFileIntegrityError, match="authenticated decryption"):
        _store(tmp_path, impostor).read_bytes(REL)
    with pytest.raises(UnknownKeyError, match="'k1'"):
        _store(tmp_path, _keyring("k2")).read_bytes(REL)
    with pytest.raises(StoredFileIntegrityError, match="no key is configured"):
        _store(tmp_path, None).read_bytes(REL)


def test_rotation_of_keys_reads_old_files_and_rewrites_them(tmp_path: Path) -> None:
    data = os.urandom(CHUNK * 2 + 7)
    old = _keyring("2025")
    _put(_store(tmp_path, old), data)
    rotated = Keyring("2026", {"2026": os.urandom(32), "2025": old.keys["2025"]})
    store = _store(tmp_path, rotated)
    assert store.key_id(REL) == "2025" and store.read_bytes(REL) == data  # read with the retired key
    assert store.reencrypt(REL) == "2025"
    assert store.key_id(REL) == "2026" and store.read_bytes(REL) == data
    assert store.reencrypt(REL) == "2026"  # nothing to do the second time
    with pytest.raises(UnknownKeyError):
        _store(tmp_path, old).read_bytes(REL)  # the old key alone no longer opens it
    assert list((tmp_path / "tmp").iterdir()) == []


def test_plaintext_legacy_file_is_read_as_it_is_and_encrypted_on_rewrite(tmp_path: Path) -> None:
    plain = sample("CT_small.dcm").read_bytes()
    _put(_store(tmp_path, None), plain)  # written before encryption was turned on
    store = _store(tmp_path, _keyring())
    assert store.key_id(REL) is None and store.read_bytes(REL) == plain
    assert store.digest(REL) == (hashlib.sha256(plain).hexdigest(), len(plain))
    assert store.reencrypt(REL) is None
    assert is_encrypted(store.absolute(REL)) and store.read_bytes(REL) == plain


def test_encryption_off_writes_plain_bytes(tmp_path: Path) -> None:
    store = _store(tmp_path, None)
    path = _put(store, b"DICM-plain")
    assert path.read_bytes() == b"DICM-plain" and store.read_bytes(REL) == b"DICM-plain"


def test_reencrypt_of_a_damaged_file_leaves_it_untouched(tmp_path: Path) -> None:
    store = _damaged(tmp_path, _flip(CHUNK + TAG_BYTES + 3))
    before = store.absolute(REL).read_bytes()
    rotated = _store(tmp_path, Keyring("k2", {"k2": os.urandom(32), "k1": _keyring().keys["k1"]}))
    with pytest.raises(StoredFileIntegrityError):
        rotated.reencrypt(REL)
    assert store.absolute(REL).read_bytes() == before
    assert list((tmp_path / "tmp").iterdir()) == []


# -- keys from settings ------------------------------------------------------------------------------


def test_key_files_in_hex_and_base64(tmp_path: Path) -> None:
    key = os.urandom(32)
    forms = {"hex": key.hex().encode() + b"\n", "b64": base64.b64encode(key) + b"\n", "upper-hex": key.hex().upper().encode()}
    for name, content in forms.items():
        path = tmp_path / name
        path.write_bytes(content)
        path.chmod(0o600)
        keyring = load_keyring(StorageEncryptionSettings(key_id="k", key_file=path))
        assert keyring is not None and keyring.keys["k"] == key, name


def test_key_from_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conf.settings import load_settings

    key = os.urandom(32)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PNEUMO_STORAGE__ENCRYPTION__KEY", key.hex())
    monkeypatch.setenv("PNEUMO_STORAGE__ENCRYPTION__KEY_ID", "env-key")
    settings = load_settings()
    assert "env-key" in repr(settings.storage.encryption) and key.hex() not in repr(settings)
    keyring = load_keyring(settings.storage.encryption)
    assert keyring is not None and keyring.current_id == "env-key" and keyring.keys["env-key"] == key


def test_bad_keys_are_refused_without_showing_them(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("00" * 16)
    with pytest.raises(EncryptionKeyError, match="not an AES-256 key") as info:
        load_keyring(StorageEncryptionSettings(key_id="k", key_file=short))
    assert "00" * 16 not in str(info.value)
    with pytest.raises(EncryptionKeyError, match="missing"):
        load_keyring(StorageEncryptionSettings(key_id="k", key_file=tmp_path / "missing"))
    with pytest.raises(EncryptionKeyError, match="key id"):
        load_keyring(StorageEncryptionSettings(key_id="bad id", key="00" * 32))  # type: ignore[arg-type]
    assert load_keyring(StorageEncryptionSettings()) is None  # off by default


@pytest.mark.parametrize(
    "section",
    [{"key_file": "/k"}, {"key_id": "k"}, {"key_id": "k", "key_file": "/k", "key": "00"},
     {"key_id": "k", "key_file": "/k", "retired_key_files": {"k": "/old"}}],
)
def test_inconsistent_settings_are_refused(section: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        StorageSettings.model_validate({"encryption": section})


def test_generated_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "store.key"
    generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keyring = load_keyring(StorageEncryptionSettings(key_id="new", key_file=path))
    assert keyring is not None and len(keyring.keys["new"]) == 32
    with pytest.raises(FileExistsError):
        generate_key_file(path)
