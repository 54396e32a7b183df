"""Append-only, hash-chained audit store and its verification.

Each record carries the hash of its predecessor, and its own hash covers every stored column:
``seq``, ``recorded_at``, ``event_id``, ``outcome``, the canonical JSON of the event, the
predecessor hash and the hash version itself. Editing, deleting, inserting or reordering any
record breaks the chain at that point, which :func:`verify_chain` reports.

A plain hash chain only proves internal consistency: whoever can write the database can also
re-hash everything after an edit, move the chain head back after deleting the newest records, or
wipe the table. Two things the database does not hold close those gaps:

* an **HMAC key** (:class:`AuditSigner`, from ``audit.hmac_key_file``): records are sealed with
  HMAC-SHA256, so re-hashing after an edit needs the key, not just write access;
* **anchor checkpoints** (:mod:`audit.anchor`): the chain head ``(seq, hash)`` copied to an
  append-only file outside the database and to the structured log; :func:`verify_chain` checks the
  chain against them, which detects truncation, a wiped table and a re-hashed prefix.

Hash versions (column ``hash_version``; migration 0007 gave existing rows version 1):

1. legacy: SHA-256 over ``seq``, ``prev_hash``, ``recorded_at`` and the event JSON. The
   ``event_id`` and ``outcome`` columns are copies of fields inside the event JSON, so verification
   checks them against it; records written before the upgrade stay verifiable as they were.
2. SHA-256 over every column (no key configured).
3. HMAC-SHA256 over every column.

A version never goes down along the chain: a keyed record followed by an unkeyed one is reported,
so an attacker without the key cannot re-hash the tail in an older, keyless form.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select
from sqlalchemy.orm import Session

from audit.events import AuditEvent
from audit.models import GENESIS_HASH, AuditChainHead, AuditRecord

HASH_LEGACY = 1
HASH_SHA256 = 2
HASH_HMAC_SHA256 = 3
HASH_VERSIONS = frozenset({HASH_LEGACY, HASH_SHA256, HASH_HMAC_SHA256})

#: ``Session.info`` key under which :func:`append` finds the process's :class:`AuditSigner`.
SIGNER_INFO_KEY = "pneumo.audit.signer"

#: Shortest accepted HMAC key: the SHA-256 block of security, as RFC 2104 recommends.
MIN_KEY_BYTES = 32


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(seq: int, prev_hash: str, recorded_at: str, event: dict[str, Any]) -> str:
    """Version 1 (legacy) hash: kept only to verify records written before migration 0007."""
    payload = canonical_json({"seq": seq, "prev": prev_hash, "recorded_at": recorded_at, "event": event})
    return hashlib.sha256(payload).hexdigest()


def record_payload(
    version: int, seq: int, prev_hash: str, recorded_at: str, event_id: str, outcome: int, event: dict[str, Any]
) -> bytes:
    """What versions 2 and 3 hash: every stored column, the version included."""
    return canonical_json(
        {
            "v": version,
            "seq": seq,
            "prev": prev_hash,
            "recorded_at": recorded_at,
            "event_id": event_id,
            "outcome": outcome,
            "event": event,
        }
    )


class AuditSigner:
    """Seals audit records: HMAC-SHA256 with a key held outside the database, else SHA-256.

    One per process, built from settings by the composition root and carried to :func:`append`
    in ``Session.info`` (see :func:`signer_session_info`), so the many call sites that append
    inside their own transactions need no extra argument. The key never appears in ``repr``,
    logs or the database.

    Key rotation: *retired* keys (oldest first) only verify; new records are sealed with *key*.
    A record does not name its key, so verification finds the key that reproduces its hash and
    requires the keys to be used in order along the chain (:func:`verify_chain`): a record sealed
    with a retired key *after* records sealed with a newer one is reported, so a retired key that
    leaked cannot be used to forge records after the rotation.
    """

    __slots__ = ("_key", "_keys")

    def __init__(self, key: bytes | None = None, retired: Sequence[bytes] = ()) -> None:
        for candidate in (key, *retired):
            if candidate is not None and len(candidate) < MIN_KEY_BYTES:
                raise ValueError(f"the audit HMAC key must be at least {MIN_KEY_BYTES} bytes")
        if retired and key is None:
            raise ValueError("retired audit HMAC keys need a current key")
        self._key = key
        #: Every key that may have sealed a record, oldest first; the current one last.
        self._keys: tuple[bytes, ...] = (*retired, key) if key is not None else ()

    @property
    def keyed(self) -> bool:
        return self._key is not None

    @property
    def version(self) -> int:
        """The hash version new records get."""
        return HASH_HMAC_SHA256 if self._key is not None else HASH_SHA256

    def seal(self, payload: bytes) -> str:
        """The hash of a new record's *payload*, under :attr:`version`."""
        if self._key is not None:
            return hmac.new(self._key, payload, hashlib.sha256).hexdigest()
        return hashlib.sha256(payload).hexdigest()

    def digest(self, version: int, payload: bytes) -> str | None:
        """The hash of *payload* under *version* (with the current key); None when it is keyed
        and we hold no key."""
        if version == HASH_HMAC_SHA256:
            return None if self._key is None else hmac.new(self._key, payload, hashlib.sha256).hexdigest()
        return hashlib.sha256(payload).hexdigest()

    def key_index(self, payload: bytes, sealed: str) -> int | None:
        """Which of the keys (0 = the oldest retired one) sealed *payload* as *sealed*; None when
        none of them did. Every key is tried, in constant time each."""
        found = None
        for index, key in enumerate(self._keys):
            if _same(hmac.new(key, payload, hashlib.sha256).hexdigest(), sealed):
                found = index
        return found

    def __repr__(self) -> str:
        return f"AuditSigner(keyed={self.keyed})"


def signer_session_info(signer: AuditSigner) -> dict[str, object]:
    """``Session.info`` entries that make every session of a ``Database`` seal with *signer*."""
    return {SIGNER_INFO_KEY: signer}


_UNKEYED = AuditSigner()


def _signer_of(session: Session) -> AuditSigner:
    signer = session.info.get(SIGNER_INFO_KEY)
    return signer if isinstance(signer, AuditSigner) else _UNKEYED


#: The statements of the append path, built once: rebuilding them per record cost more than the
#: hashing (SQLAlchemy caches compiled SQL, but not the construction of the statement objects).
_HEAD = cast(Table, AuditChainHead.__table__)
_RECORDS = cast(Table, AuditRecord.__table__)
_LOCK_HEAD = select(_HEAD.c.last_seq, _HEAD.c.last_hash).where(_HEAD.c.id == 1).with_for_update()
_MOVE_HEAD = _HEAD.update().where(_HEAD.c.id == 1).values(last_seq=bindparam("seq"), last_hash=bindparam("hash"))
_INSERT_RECORDS = insert(_RECORDS)


def append(session: Session, event: AuditEvent) -> AuditRecord:
    """Append *event* inside the caller's transaction (committed, or rolled back, with it).

    The record is sealed with the signer found in ``session.info`` (HMAC when the process has a
    key), else plain SHA-256. Returns the record as written (not attached to the session).
    """
    [record] = _append_rows(session, [event])
    return AuditRecord(**record)


def append_many(session: Session, events: Sequence[AuditEvent]) -> int:
    """Append *events* in order inside the caller's transaction: one chain-head lock and one
    multi-row INSERT for all of them (a batch of FHIR access records, the HL7 messages of one
    group commit), each record sealed exactly as :func:`append` seals it. Returns the sequence
    number of the last record (0 if none)."""
    rows = _append_rows(session, events)
    return int(rows[-1]["seq"]) if rows else 0


def _append_rows(session: Session, events: Sequence[AuditEvent]) -> list[dict[str, Any]]:
    """Lock the chain head, seal *events* after it, insert them and move the head (Core, on the
    session's connection: the head is never loaded as an ORM object, so no stale copy of it can
    outlive this call in the session's identity map)."""
    if not events:
        return []
    signer = _signer_of(session)
    connection = session.connection()
    seq, previous = connection.execute(_LOCK_HEAD).one()
    rows: list[dict[str, Any]] = []
    for event in events:
        row = _sealed(signer, seq + 1, previous, event)
        seq, previous = row["seq"], row["hash"]
        rows.append(row)
    connection.execute(_INSERT_RECORDS, rows)
    connection.execute(_MOVE_HEAD, {"seq": seq, "hash": previous})
    return rows


def _sealed(signer: AuditSigner, seq: int, prev_hash: str, event: AuditEvent) -> dict[str, Any]:
    """The row of *event* at position *seq* after *prev_hash*, sealed by *signer* (not yet written)."""
    recorded_at = dt.datetime.now(dt.UTC)
    data = event.to_dict()
    event_id = event.event_id.code
    outcome = int(event.outcome)
    version = signer.version
    payload = record_payload(version, seq, prev_hash, recorded_at.isoformat(), event_id, outcome, data)
    return {
        "seq": seq,
        "recorded_at": recorded_at,
        "event_id": event_id,
        "outcome": outcome,
        "event": data,
        "prev_hash": prev_hash,
        "hash": signer.seal(payload),
        "hash_version": version,
    }


@dataclass(frozen=True)
class Checkpoint:
    """The chain head as it was at *at*: record *seq* had hash *hash* (see :mod:`audit.anchor`)."""

    seq: int
    hash: str
    at: str = ""


@dataclass(frozen=True)
class ChainVerification:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str | None = None
    #: First record sealed with the HMAC key (None: no keyed records).
    keyed_from_seq: int | None = None
    #: Highest sequence number pinned by an anchor checkpoint (None: no checkpoints checked).
    anchored_seq: int | None = None


def _same(a: str, b: str) -> bool:
    """Constant-time comparison that also copes with non-ASCII junk written into a hash column."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _check_record(row: AuditRecord, signer: AuditSigner, newest_version: int, newest_key: int) -> tuple[str | None, int]:
    """What is wrong with *row* on its own (None: nothing), given the newest version and the newest
    HMAC key (index into the signer's keys, -1: none yet) seen before it; and the newest key
    after it."""
    version = row.hash_version
    if version not in HASH_VERSIONS:
        return f"unknown hash version {version}", newest_key
    if version < newest_version:
        return (f"hash version went down from {newest_version} to {version} (records re-hashed without the key?)",
                newest_key)
    event = row.event if isinstance(row.event, dict) else {}
    event_id = event.get("event_id")
    if not isinstance(event_id, dict) or event_id.get("code") != row.event_id or event.get("outcome") != row.outcome:
        return "the event_id or outcome column does not match the recorded event", newest_key
    recorded_at = row.recorded_at.astimezone(dt.UTC).isoformat()
    if version == HASH_LEGACY:
        expected = record_hash(row.seq, row.prev_hash, recorded_at, row.event)
    elif version == HASH_HMAC_SHA256:
        if not signer.keyed:
            return "record is sealed with an HMAC key; configure audit.hmac_key_file to verify it", newest_key
        payload = record_payload(version, row.seq, row.prev_hash, recorded_at, row.event_id, row.outcome, row.event)
        index = signer.key_index(payload, row.hash)
        if index is None:
            return "record content does not match its hash", newest_key
        if index < newest_key:
            return "record is sealed with an older HMAC key than the records before it (a retired key reused?)", index
        return None, index
    else:
        expected = hashlib.sha256(
            record_payload(version, row.seq, row.prev_hash, recorded_at, row.event_id, row.outcome, row.event)
        ).hexdigest()
    if not _same(expected, row.hash):
        return "record content does not match its hash", newest_key
    return None, newest_key


def verify_chain(
    session: Session,
    *,
    signer: AuditSigner | None = None,
    checkpoints: Sequence[Checkpoint] | None = None,
    batch: int = 5000,
) -> ChainVerification:
    """Walk the whole chain in order, recomputing every hash.

    *signer* must hold the HMAC key when records were sealed with one. *checkpoints* (from the
    anchor file) pin ``(seq, hash)`` pairs the chain must still contain: a different hash at an
    anchored seq means the records after the last matching checkpoint were rewritten, and a chain
    shorter than the newest checkpoint means its newest records were removed.

    The head and every record are read from one snapshot, so a gateway appending meanwhile is
    neither a false alarm nor a hiding place: on PostgreSQL the session's transaction is made
    REPEATABLE READ when it has not begun yet (under READ COMMITTED each statement would see the
    newest commits, and records appended after the head was read would look like tampering);
    SQLite's read transaction is a snapshot already.
    """
    if not session.in_transaction() and session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    signer = signer or _UNKEYED
    pins = sorted((c for c in checkpoints or () if c.seq >= 1), key=lambda c: c.seq)
    anchored_seq = pins[-1].seq if pins else None
    pin_index, last_good_pin = 0, 0
    head = session.execute(select(AuditChainHead).where(AuditChainHead.id == 1)).scalar_one()
    expected_prev, expected_seq, count = GENESIS_HASH, 1, 0
    newest_version, keyed_from, newest_key = HASH_LEGACY, None, -1
    last_seq = 0

    def bad(seq: int, problem: str) -> ChainVerification:
        return ChainVerification(False, count, seq, problem, keyed_from, anchored_seq)

    while True:
        rows = session.execute(
            select(AuditRecord).where(AuditRecord.seq > last_seq).order_by(AuditRecord.seq).limit(batch)
        ).scalars().all()
        if not rows:
            break
        for row in rows:
            if row.seq != expected_seq:
                return bad(expected_seq, f"record {expected_seq} is missing")
            if row.prev_hash != expected_prev:
                return bad(row.seq, "predecessor hash does not match")
            problem, newest_key = _check_record(row, signer, newest_version, newest_key)
            if problem is not None:
                return bad(row.seq, problem)
            while pin_index < len(pins) and pins[pin_index].seq == row.seq:
                pin = pins[pin_index]
                if not _same(pin.hash, row.hash):
                    return bad(
                        last_good_pin + 1,
                        f"records {last_good_pin + 1}..{row.seq} were rewritten: record {row.seq} differs from "
                        f"the anchor checkpoint of {pin.at or 'an earlier run'}",
                    )
                last_good_pin = row.seq
                pin_index += 1
            if row.hash_version == HASH_HMAC_SHA256 and keyed_from is None:
                keyed_from = row.seq
            newest_version = max(newest_version, row.hash_version)
            expected_prev, expected_seq, count = row.hash, row.seq + 1, count + 1
            last_seq = row.seq
        session.expunge_all()
    if pins and pins[-1].seq > count:
        pin = pins[-1]
        return bad(
            count + 1,
            f"newest records were removed: the anchor checkpoint of {pin.at or 'an earlier run'} holds record "
            f"{pin.seq}, the audit log ends at {count}",
        )
    if head.last_seq != count or head.last_hash != expected_prev:
        return bad(count + 1, "newest records were removed (chain head ahead)")
    return ChainVerification(True, count, None, None, keyed_from, anchored_seq)
