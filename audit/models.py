"""The audit tables, declared on storage's Base so that an action and its audit record commit in
one transaction. The schema is created by storage's Alembic migrations."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from storage.models import Base

GENESIS_HASH = "0" * 64


class AuditRecord(Base):
    """One append-only audit record; ``hash`` covers every column (see ``audit.store``).

    ``hash_version`` says how ``hash`` was computed: 1 legacy SHA-256 (records written before
    migration 0007), 2 SHA-256 over every column, 3 HMAC-SHA256 over every column.
    """

    __tablename__ = "audit_record"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False)
    recorded_at: Mapped[dt.datetime] = mapped_column(index=True)
    event_id: Mapped[str] = mapped_column(String(16), index=True)
    outcome: Mapped[int] = mapped_column(Integer)
    event: Mapped[dict[str, Any]] = mapped_column()
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash_version: Mapped[int] = mapped_column(Integer, default=1)


class AuditChainHead(Base):
    """A single row (id = 1) holding the newest sequence number and hash.

    Appending locks this row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's single writer
    does the same), which serialises appenders and makes the chain a strict sequence even with
    many processes writing. It also lets ``verify`` detect truncation of the newest records.
    """

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(String(64))
