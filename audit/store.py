"""Append-only, hash-chained audit store and its verification.

Each record carries the SHA-256 of its predecessor; the record's own hash covers its sequence
number, that predecessor hash and the canonical JSON of the event. Editing, deleting, inserting
or reordering any record breaks the chain at that point, which :func:`verify_chain` reports.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.events import AuditEvent
from audit.models import GENESIS_HASH, AuditChainHead, AuditRecord


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(seq: int, prev_hash: str, recorded_at: str, event: dict[str, Any]) -> str:
    payload = canonical_json({"seq": seq, "prev": prev_hash, "recorded_at": recorded_at, "event": event})
    return hashlib.sha256(payload).hexdigest()


def append(session: Session, event: AuditEvent) -> AuditRecord:
    """Append *event* inside the caller's transaction (committed, or rolled back, with it)."""
    head = session.execute(
        select(AuditChainHead).where(AuditChainHead.id == 1).with_for_update()
    ).scalar_one()
    seq = head.last_seq + 1
    recorded_at = dt.datetime.now(dt.UTC)
    data = event.to_dict()
    digest = record_hash(seq, head.last_hash, recorded_at.isoformat(), data)
    record = AuditRecord(
        seq=seq,
        recorded_at=recorded_at,
        event_id=event.event_id.code,
        outcome=int(event.outcome),
        event=data,
        prev_hash=head.last_hash,
        hash=digest,
    )
    session.add(record)
    head.last_seq = seq
    head.last_hash = digest
    session.flush()
    return record


@dataclass(frozen=True)
class ChainVerification:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str | None = None


def verify_chain(session: Session, *, batch: int = 5000) -> ChainVerification:
    """Walk the whole chain in order, recomputing every hash."""
    head = session.execute(select(AuditChainHead).where(AuditChainHead.id == 1)).scalar_one()
    expected_prev, expected_seq, count = GENESIS_HASH, 1, 0
    last_seq = 0
    while True:
        rows = session.execute(
            select(AuditRecord).where(AuditRecord.seq > last_seq).order_by(AuditRecord.seq).limit(batch)
        ).scalars().all()
        if not rows:
            break
        for row in rows:
            if row.seq != expected_seq:
                return ChainVerification(False, count, expected_seq, f"record {expected_seq} is missing")
            if row.prev_hash != expected_prev:
                return ChainVerification(False, count, row.seq, "predecessor hash does not match")
            recorded_at = row.recorded_at.astimezone(dt.UTC).isoformat()
            if record_hash(row.seq, row.prev_hash, recorded_at, row.event) != row.hash:
                return ChainVerification(False, count, row.seq, "record content does not match its hash")
            expected_prev, expected_seq, count = row.hash, row.seq + 1, count + 1
            last_seq = row.seq
        session.expunge_all()
    if head.last_seq != count or head.last_hash != expected_prev:
        return ChainVerification(False, count, count + 1, "newest records were removed (chain head ahead)")
    return ChainVerification(True, count)
