"""The fingerprint of the configuration a process started with, for its Application Start record.

The gateway reads its configuration only at start, so a configuration change shows in the audit
trail as a stop and a start whose fingerprint differs (PS3.15 A.5.3.1 Application Activity; HIPAA
§164.312(b) asks that changes to the system be traceable). The file's SHA-256 says *that* it
changed without copying secrets (a JWT secret, key paths) into the audit log; the file itself, kept
under change control, says *what*.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from conf.settings import DEFAULT_CONFIG_FILE


def config_fingerprint(path: Path | None) -> str:
    """``"configuration <name> sha256:<hex>"`` of *path*, else of the default file that
    ``load_settings`` reads when there is one; the defaults (no file) or an unreadable file say so."""
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    if path is None:
        return "configuration: built-in defaults and environment"
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"configuration {path.name}: unreadable ({exc.strerror})"
    return f"configuration {path.name} sha256:{digest}"
