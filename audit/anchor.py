"""Anchors for the audit chain outside the database: the HMAC key and head checkpoints.

Whoever can write the database can rewrite a plain hash chain consistently: delete the newest
records and move the chain head back, re-hash everything after an edit, or wipe the table and
reset the head. Nothing inside the database can prove otherwise, so two things live outside it:

* the **HMAC key** (:func:`load_signer`), read from a file named by ``audit.hmac_key_file``
  (``PNEUMO_AUDIT__HMAC_KEY_FILE``). It is never stored in the database and never logged;
* **checkpoints** of the chain head: :class:`ChainAnchor` (run by ``pneumo serve``) appends the
  head ``(seq, hash)`` to an append-only file (:class:`AnchorFile`, one fsynced JSON line per
  checkpoint) every ``audit.anchor_every`` records or ``audit.anchor_interval_seconds``, and at
  start and stop, and logs each one as the structured event ``audit.anchor`` (sequence number and
  hash only: no PHI), so a copy also reaches wherever the logs are shipped.

:func:`verify_anchored` checks the chain against every checkpoint: a chain shorter than the
newest checkpoint (truncation, a wiped table) or a different hash at a checkpointed seq (a
re-hashed prefix) fails. Records newer than the newest checkpoint are protected by the key only.
Before ``pneumo serve`` has ever started there is no checkpoint yet (see :func:`verify_anchored`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.events import EventId, EventType
from audit.models import AuditChainHead, AuditRecord
from audit.store import MIN_KEY_BYTES, AuditSigner, ChainVerification, Checkpoint, verify_chain
from conf.errors import InvalidInputError
from storage.db import Database

log = structlog.get_logger(__name__)


class AuditKeyError(InvalidInputError):
    """The configured audit HMAC key file cannot be used (missing, unreadable, too short)."""


class AnchorFileError(InvalidInputError):
    """The anchor file cannot be read as checkpoints (a line in the middle is not one)."""


def load_signer(key_file: Path | None, retired_key_files: Sequence[Path] = ()) -> AuditSigner:
    """The process's :class:`AuditSigner`: keyed from *key_file*, or unkeyed when None; the keys
    in *retired_key_files* (oldest first) only verify records sealed before a key rotation.

    Each file's bytes, with surrounding whitespace stripped, are the key (e.g. the output of
    ``openssl rand -hex 32``). Errors name the file, never its content. A key readable by group or
    others is accepted with a warning: container secret mounts are often 0644.
    """
    if key_file is None:
        if retired_key_files:
            raise AuditKeyError("audit.retired_hmac_key_files needs audit.hmac_key_file (the current key)")
        return AuditSigner()
    key = _read_key(key_file, "audit.hmac_key_file")
    retired = [_read_key(path, "audit.retired_hmac_key_files") for path in retired_key_files]
    try:
        return AuditSigner(key, retired)
    except ValueError as exc:
        raise AuditKeyError(f"audit HMAC keys ({key_file}, {len(retired)} retired): {exc}") from None


def _read_key(key_file: Path, setting: str) -> bytes:
    try:
        key = key_file.read_bytes().strip()
        mode = key_file.stat().st_mode
    except OSError as exc:
        raise AuditKeyError(f"{setting} {key_file}: {exc.strerror or exc.__class__.__name__}") from None
    if len(key) < MIN_KEY_BYTES:
        raise AuditKeyError(f"{setting} {key_file}: the audit HMAC key must be at least {MIN_KEY_BYTES} bytes")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("audit.key_file_permissive", path=str(key_file), mode=oct(stat.S_IMODE(mode)))
    return key


class AnchorFile:
    """An append-only file of chain-head checkpoints, one JSON line each, fsynced per line.

    Each line is written with one ``write`` on an ``O_APPEND`` descriptor, so a crash leaves at
    most a torn last line, which reading ignores. Protect the file further with ``chattr +a``
    (append-only even for its owner) or by placing it on storage the database host cannot rewrite.
    """

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self._lock = threading.Lock()

    def append(self, seq: int, digest: str, *, keyed: bool) -> Checkpoint:
        at = dt.datetime.now(dt.UTC).isoformat()
        line = json.dumps({"seq": seq, "hash": digest, "keyed": keyed, "at": at}, separators=(",", ":")) + "\n"
        with self._lock:
            created = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode("ascii"))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if created and self.fsync:
                _fsync_dir(self.path.parent)
        return Checkpoint(seq, digest, at)

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> list[Checkpoint]:
        """Every checkpoint in the file, oldest first; [] when the file does not exist."""
        try:
            text = self.path.read_text("ascii")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise AnchorFileError(f"anchor file {self.path} cannot be read: {exc.__class__.__name__}") from None
        lines = text.split("\n")
        checkpoints: list[Checkpoint] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                checkpoints.append(Checkpoint(int(data["seq"]), str(data["hash"]), str(data.get("at", ""))))
            except (ValueError, KeyError, TypeError):
                if number == len(lines):  # a torn last line (crash mid-write, no newline yet)
                    continue
                raise AnchorFileError(f"anchor file {self.path}: line {number} is not a checkpoint") from None
        return checkpoints

    def newest(self) -> Checkpoint | None:
        checkpoints = self.read()
        return max(checkpoints, key=lambda c: c.seq) if checkpoints else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_head(session: Session) -> tuple[int, str]:
    head = session.execute(select(AuditChainHead).where(AuditChainHead.id == 1)).scalar_one()
    return head.last_seq, head.last_hash


@dataclass(frozen=True)
class AnchorOptions:
    every: int = 100
    interval_seconds: float = 5.0


class ChainAnchor:
    """Checkpoints the chain head of the database into an :class:`AnchorFile` and the log.

    It polls the one-row chain head instead of hooking commits: records are appended by every
    thread and by other processes (extra acceptors, ``pneumo worker`` on other hosts), and a
    checkpoint must name a committed head, never one of a transaction that later rolls back.
    The poll is a primary-key read once a second. A head that went *back* (records removed while
    we run) is logged as ``audit.anchor_regressed`` and still checkpointed: verification checks
    every checkpoint, so the earlier, higher one keeps the removal visible.
    """

    def __init__(
        self, database: Database, anchor_file: AnchorFile, signer: AuditSigner, options: AnchorOptions
    ) -> None:
        self.database = database
        self.file = anchor_file
        self.signer = signer
        self.options = options
        self._last: Checkpoint | None = None
        self._last_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Checkpoint now, then every ``every`` records or ``interval_seconds`` while it advances."""
        try:
            self._last = self.file.newest()
        except AnchorFileError as exc:
            log.error("audit.anchor_unreadable", error=str(exc))
        self.checkpoint(force=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="audit-anchor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and write a final checkpoint (after the Application Stop record)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        try:
            self.checkpoint(force=True)
        except Exception:  # noqa: BLE001 - stopping must finish; the failure is on record
            log.error("audit.anchor_failed", exc_info=True)

    def _run(self) -> None:
        poll = min(1.0, self.options.interval_seconds)
        while not self._stop.wait(poll):
            try:
                self.checkpoint()
            except Exception:  # noqa: BLE001 - keep anchoring through a database outage
                log.warning("audit.anchor_failed", exc_info=True)

    def checkpoint(self, *, force: bool = False) -> Checkpoint | None:
        """Write a checkpoint if the head moved enough (or moved at all, with *force*)."""
        with self._lock:
            with self.database.read_session() as session:
                seq, digest = read_head(session)
            last = self._last
            if seq == 0 or (last is not None and (last.seq, last.hash) == (seq, digest)):
                return None
            now = time.monotonic()
            if not force and last is not None and last.seq <= seq:
                due = seq - last.seq >= self.options.every or now - self._last_at >= self.options.interval_seconds
                if not due:
                    return None
            if last is not None and (seq < last.seq or (seq == last.seq and digest != last.hash)):
                log.error("audit.anchor_regressed", seq=seq, anchored_seq=last.seq)
            checkpoint = self.file.append(seq, digest, keyed=self.signer.keyed)
            log.info("audit.anchor", seq=seq, hash=digest, keyed=self.signer.keyed)
            self._last, self._last_at = checkpoint, now
            return checkpoint


#: The process name of ``pneumo serve``'s Application Start records (gateway/app.py): the process
#: that writes the checkpoints, at every start.
SERVE_PROCESS_NAME = "pneumo serve"


def served(session: Session) -> bool:
    """Whether the chain records an Application Start of ``pneumo serve`` (PS3.15 A.5.3.1)."""
    activities = session.execute(
        select(AuditRecord.event).where(AuditRecord.event_id == EventId.APPLICATION_ACTIVITY.code)
    ).scalars()
    for event in activities:
        types = {(t.get("system"), t.get("code")) for t in event.get("event_types") or []}
        if (EventType.APPLICATION_START.system, EventType.APPLICATION_START.code) in types and any(
            p.get("user_id") == SERVE_PROCESS_NAME for p in event.get("participants") or []
        ):
            return True
    return False


def verify_anchored(session: Session, signer: AuditSigner, anchor_file: AnchorFile) -> ChainVerification:
    """:func:`audit.store.verify_chain` against every checkpoint of *anchor_file*.

    A missing or empty anchor file is a failure when the chain records a start of ``pneumo
    serve`` (which checkpoints at every start, so a served log always has one): without
    checkpoints, removing the newest records, or all of them, cannot be told from a log that
    never had them. Before the first ``pneumo serve`` — a new install where ``pneumo db upgrade``
    (or ``db reindex``, ``deliveries retry``, ``audit export``, a ``pneumo worker``) already
    wrote records — no checkpoint can exist yet; the chain is then verified on its own (edits,
    removals, reordering and, with the key, forgeries are still found) and ``anchored_seq`` stays
    None. Removing the records of a served log down to such a prefix needs the anchor file to go
    too, and the database alone cannot do that: its checkpoints name the removed records.
    """
    try:
        checkpoints = anchor_file.read()
    except AnchorFileError as exc:
        return ChainVerification(False, 0, None, str(exc))
    result = verify_chain(session, signer=signer, checkpoints=checkpoints)
    if result.ok and result.records > 0 and not checkpoints and served(session):
        state = "holds no checkpoints" if anchor_file.exists() else "is missing"
        return ChainVerification(
            False,
            result.records,
            None,
            f"anchor file {anchor_file.path} {state}: removal of the newest records cannot be ruled out",
            result.keyed_from_seq,
            None,
        )
    return result
