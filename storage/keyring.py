"""The file store's keys, from ``[storage.encryption]``: read once per process, at start.

Secrets come from files (container secret mounts, ``/run/secrets``) or from one environment
variable, never from the configuration file or the database (docs/architecture.md §5 "Secrets
from files/env"): whoever can read the database or a backup of the store must not get the key
with it. Errors name the setting and the file, never the key.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import structlog

from conf.errors import InvalidInputError
from conf.settings import StorageEncryptionSettings
from storage.encryption import KEY_BYTES, Keyring, decode_key, valid_key_id

log = structlog.get_logger(__name__)


class EncryptionKeyError(InvalidInputError):
    """A configured file-store key cannot be used (missing, unreadable, not 32 bytes, bad id)."""


def _read_key(path: Path, setting: str) -> bytes:
    try:
        material = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise EncryptionKeyError(f"{setting} {path}: {exc.strerror or exc.__class__.__name__}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Container secret mounts are often 0644; say so rather than refuse.
        log.warning("storage.key_file_permissive", path=str(path), mode=oct(stat.S_IMODE(mode)))
    try:
        return decode_key(material, f"{setting} {path}")
    except ValueError as exc:
        raise EncryptionKeyError(str(exc)) from None


def load_keyring(settings: StorageEncryptionSettings) -> Keyring | None:
    """The keyring of *settings*, or None when encryption is off (no key configured)."""
    if not settings.enabled or settings.key_id is None:
        return None
    try:
        valid_key_id(settings.key_id)
        for key_id in settings.retired_key_files:
            valid_key_id(key_id)
    except ValueError as exc:
        raise EncryptionKeyError(f"storage.encryption: {exc}") from None
    if settings.key_file is not None:
        current = _read_key(settings.key_file, "storage.encryption.key_file")
    elif settings.key is not None:
        try:
            current = decode_key(settings.key.get_secret_value().encode("utf-8"), "storage.encryption.key")
        except ValueError as exc:
            raise EncryptionKeyError(str(exc)) from None
    else:  # pragma: no cover - excluded by the settings validator
        raise EncryptionKeyError("storage.encryption: key_id is set but no key is")
    keys = {key_id: _read_key(path, f"storage.encryption.retired_key_files.{key_id}")
            for key_id, path in settings.retired_key_files.items()}
    keys[settings.key_id] = current
    return Keyring(settings.key_id, keys)


def generate_key_file(path: Path) -> None:
    """Write a new random AES-256 key as 64 hex digits to *path* (mode 0600; never overwrites)."""
    material = secrets.token_bytes(KEY_BYTES).hex() + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even empty
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(material)
        handle.flush()
        os.fsync(handle.fileno())
