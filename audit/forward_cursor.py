"""The forwarder's durable position in the audit log: the last sequence number it has sent.

The audit table itself is the buffer while the Audit Record Repository is down: it is durable,
append-only and strictly ordered by ``seq`` (appending locks the one-row chain head, so sequence
numbers commit in order and a rolled-back append gives its number back: no gaps). All the
forwarder must remember is how far it got, and it keeps that outside the database in a small
file, written atomically (write a temporary file, fsync it, rename it over the old one, fsync the
directory: POSIX ``rename`` replaces the name in one step, so a crash leaves the old position or
the new one, never a torn file). No schema change is needed, and a read-only replica of the
database would do for the reading side.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from conf.errors import InvalidInputError


class CursorFileError(InvalidInputError):
    """The cursor file exists but does not hold a position (edited by hand, or not ours)."""


class ForwardCursor:
    """``<data_dir>/audit-forward.cursor``: ``{"seq": N, "at": "<ISO time>"}``."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync

    def read(self) -> int | None:
        """The last forwarded sequence number; None when nothing was ever forwarded (no file)."""
        try:
            text = self.path.read_text("ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise CursorFileError(f"audit forward cursor {self.path} cannot be read: {exc.__class__.__name__}") from None
        try:
            seq = json.loads(text)["seq"]
        except (ValueError, KeyError, TypeError):
            raise CursorFileError(f"audit forward cursor {self.path} does not hold a position") from None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise CursorFileError(f"audit forward cursor {self.path} does not hold a position")
        return seq

    def write(self, seq: int) -> None:
        """Make *seq* the durable position (atomic replace; fsynced unless ``storage.fsync`` is off)."""
        if seq < 0:
            raise ValueError("seq must not be negative")
        data = json.dumps({"seq": seq, "at": dt.datetime.now(dt.UTC).isoformat()}, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, data.encode("ascii"))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        if self.fsync:
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
