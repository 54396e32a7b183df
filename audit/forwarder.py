"""Forwarding of the audit log to an IHE ATNA Audit Record Repository (ITI-20, RFC 5424/5425).

:class:`AuditForwarder` runs as a thread of ``pneumo serve``. Each round it reads the records
after its cursor (:class:`~audit.forward_cursor.ForwardCursor`) from the audit table in ``seq``
order, ``batch_size`` at a time, renders each as a DICOM PS3.15 A.5 XML audit message
(:func:`audit.dicom_xml.audit_message`) inside an RFC 5424 syslog message
(:mod:`audit.syslog`), writes the octet-counted frames to one TLS connection
(:mod:`audit.syslog_transport`), and only then moves the cursor past them.

**Buffering.** While the repository is down nothing is lost or held in memory: the records stay
in the audit table (durable, append-only, ordered), the cursor does not move, and reconnection is
retried with exponential backoff (``retry_initial_seconds`` doubling to ``retry_max_seconds``).
When the repository is back the forwarder catches up in ``seq`` order, a batch at a time; a
restarted gateway resumes from the cursor file.

**Delivery is at-least-once towards our TCP stack, not end to end.** RFC 5425 has no
acknowledgement. The cursor moves after the TLS write completed, i.e. after the frames were
handed to the kernel: a crash between that write and the cursor update sends the batch again (the
repository sees duplicates, which it can recognise by EventDateTime and content), while frames
still in the socket buffers when the repository itself fails can be lost without our knowing.
The audit table is the record of truth (hash-chained, ``pneumo audit verify``); the repository
holds a copy.

**Logs** (no PHI: counts, sequence numbers, the repository's address, error classes):
``audit.forward_connected``, ``audit.forward_failed`` (first failure, a changed error, then once a
minute while down), ``audit.forward_caught_up``, ``audit.forward_unrenderable`` (a record whose
XML cannot be built is skipped, logged with its seq, so one bad record cannot stop the rest),
``audit.forward_cursor_ahead`` (the cursor is past the chain head: the database was restored or
truncated; the cursor is moved back to the head).

Run one forwarder per audit log: two ``pneumo serve`` nodes sharing a PostgreSQL database would
each send every record.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select

from audit.anchor import read_head
from audit.dicom_xml import audit_message
from audit.forward_cursor import CursorFileError, ForwardCursor
from audit.models import AuditRecord
from audit.syslog import GUARANTEED_MESSAGE_OCTETS, SyslogHeader, frame, severity_for_outcome, syslog_message
from audit.syslog_transport import SyslogTlsConnection
from conf.settings import AuditSyslogSettings
from conf.tls import client_context
from storage.db import Database

log = structlog.get_logger(__name__)

#: Renders one stored event (its JSON dict and the time it was recorded) as XML bytes.
Renderer = Callable[[Mapping[str, Any], dt.datetime], bytes]

#: How often a persisting failure is logged again.
_REPEAT_LOG_SECONDS = 60.0


@dataclass(frozen=True)
class ForwarderOptions:
    batch_size: int = 100
    poll_interval_seconds: float = 1.0
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    utf8_bom: bool = False
    start_at: str = "oldest"


@dataclass(frozen=True)
class ForwarderStatus:
    """What the forwarder knows now (for logs and health details; no PHI)."""

    connected: bool
    forwarded_seq: int | None
    head_seq: int | None
    sent: int
    skipped: int
    last_error: str | None

    @property
    def lag(self) -> int | None:
        """Records in the audit log not yet sent (None until the first round)."""
        if self.head_seq is None or self.forwarded_seq is None:
            return None
        return max(0, self.head_seq - self.forwarded_seq)


class AuditForwarder:
    """Sends the audit log, in order, to one Audit Record Repository (see the module docstring)."""

    def __init__(
        self,
        database: Database,
        cursor: ForwardCursor,
        connection: SyslogTlsConnection,
        header: SyslogHeader,
        options: ForwarderOptions,
        *,
        render: Renderer = audit_message,
    ) -> None:
        self.database = database
        self.cursor = cursor
        self.connection = connection
        self.header = header
        self.options = options
        self._render = render
        self._position: int | None = None
        self._status = ForwarderStatus(False, None, None, 0, 0, None)
        self._status_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = options.retry_initial_seconds
        self._last_error_logged_at = 0.0
        #: Set while catching up (a backlog or a failure); cleared, with a log line, when caught up.
        self._behind = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="audit-forwarder", daemon=True)
        self._thread.start()
        log.info(
            "audit.forward_started", host=self.connection.host, port=self.connection.port,
            batch_size=self.options.batch_size,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current round and, if the repository is connected, send what is left
        (the Application Stop record written just before) for up to *timeout* seconds; whatever
        remains waits in the table for the next start."""
        self._stop.set()
        finished = True
        if self._thread is not None:
            self._thread.join(timeout)
            finished = not self._thread.is_alive()  # else it is stuck in a connect: leave it alone
            self._thread = None
        deadline = time.monotonic() + timeout
        try:
            while finished and self.connection.connected and time.monotonic() < deadline:
                if self.forward_once() < self.options.batch_size:
                    break
        except Exception as exc:  # noqa: BLE001 - stopping must finish; the rest is sent next start
            self._failed(exc)
        self.connection.close()
        self._update(connected=False)
        status = self.status()
        log.info("audit.forward_stopped", forwarded_seq=status.forwarded_seq, lag=status.lag, sent=status.sent)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> ForwarderStatus:
        with self._status_lock:
            return self._status

    def _update(self, **changes: Any) -> None:
        with self._status_lock:
            self._status = replace(self._status, **changes)

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                sent = self.forward_once()
            except Exception as exc:  # noqa: BLE001 - repository or database down: retry with backoff
                self.connection.close()
                self._behind = True
                self._failed(exc)
                delay, self._backoff = self._backoff, min(self._backoff * 2, self.options.retry_max_seconds)
                continue
            self._backoff = self.options.retry_initial_seconds
            delay = 0.0 if sent >= self.options.batch_size else self.options.poll_interval_seconds

    def _failed(self, exc: Exception) -> None:
        error = f"{exc.__class__.__name__}: {exc}"
        previous = self.status().last_error
        self._update(connected=False, last_error=error)
        now = time.monotonic()
        if error != previous or now - self._last_error_logged_at >= _REPEAT_LOG_SECONDS:
            self._last_error_logged_at = now
            status = self.status()
            log.warning(
                "audit.forward_failed", host=self.connection.host, port=self.connection.port, error=error,
                lag=status.lag, retry_in_seconds=self._backoff,
            )

    def forward_once(self) -> int:
        """One round: send up to ``batch_size`` records after the cursor; return how many were sent.

        Raises on a transport or database failure, with the cursor where it was.
        """
        position = self._current_position()
        with self.database.read_session() as session:
            head, _ = read_head(session)
            if position > head:
                log.error("audit.forward_cursor_ahead", forwarded_seq=position, head_seq=head)
                self.cursor.write(head)
                self._position = position = head
            rows = session.execute(
                select(AuditRecord.seq, AuditRecord.recorded_at, AuditRecord.outcome, AuditRecord.event)
                .where(AuditRecord.seq > position)
                .order_by(AuditRecord.seq)
                .limit(self.options.batch_size)
            ).all()
        self._update(head_seq=head, forwarded_seq=position)
        if not rows:
            if self.connection.connected and self.connection.peer_closed():
                self.connection.close()
                self._update(connected=False)
                log.info("audit.forward_disconnected", host=self.connection.host, reason="closed by the repository")
            return 0
        if head - position > self.options.batch_size:
            self._behind = True
        payload, skipped = self._frames(rows)
        if not self.connection.connected:
            self.connection.connect()
            self._update(connected=True, last_error=None)
            log.info("audit.forward_connected", host=self.connection.host, port=self.connection.port, lag=head - position)
        if payload:
            self.connection.send(payload)
        last = int(rows[-1].seq)
        self.cursor.write(last)
        self._position = last
        status = self.status()
        self._update(forwarded_seq=last, sent=status.sent + len(rows) - skipped, skipped=status.skipped + skipped,
                     last_error=None)
        if last >= head and self._behind:
            self._behind = False
            log.info("audit.forward_caught_up", forwarded_seq=last, sent=self.status().sent)
        return len(rows)

    def _current_position(self) -> int:
        if self._position is not None:
            return self._position
        try:
            stored = self.cursor.read()
        except CursorFileError:
            log.error("audit.forward_cursor_unreadable", path=str(self.cursor.path))
            raise
        if stored is None:
            if self.options.start_at == "newest":
                with self.database.read_session() as session:
                    stored, _ = read_head(session)
            else:
                stored = 0
            self.cursor.write(stored)
            log.info("audit.forward_cursor_created", path=str(self.cursor.path), forwarded_seq=stored)
        self._position = stored
        return stored

    def _frames(self, rows: Any) -> tuple[bytes, int]:
        frames: list[bytes] = []
        skipped = 0
        for row in rows:
            try:
                xml = self._render(row.event, row.recorded_at)
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the others
                skipped += 1
                log.error("audit.forward_unrenderable", seq=row.seq, error=exc.__class__.__name__)
                continue
            message = syslog_message(
                self.header, severity=severity_for_outcome(int(row.outcome)), when=row.recorded_at,
                payload=xml, bom=self.options.utf8_bom,
            )
            if len(message) > GUARANTEED_MESSAGE_OCTETS:
                log.warning("audit.forward_large_message", seq=row.seq, octets=len(message))
            frames.append(frame(message))
        return b"".join(frames), skipped


def build_forwarder(
    settings: AuditSyslogSettings, database: Database, cursor_file: Path, *, fsync: bool = True,
    render: Renderer = audit_message,
) -> AuditForwarder:
    """The forwarder ``[audit.syslog]`` describes (the caller checks ``enabled``); the TLS
    context is built here, so a missing certificate file fails at start, not at the first send."""
    if not settings.host:
        raise ValueError("audit.syslog: host is not set")
    context = client_context(settings.tls, check_hostname=settings.check_hostname)
    if settings.tls.cert_file is None:
        log.warning("audit.forward_no_client_certificate", reason="ATNA node authentication expects one")
    connection = SyslogTlsConnection(settings.host, settings.port, context, timeout=settings.connect_timeout_seconds)
    header = SyslogHeader(
        hostname=settings.hostname or _local_hostname(),
        app_name=settings.app_name,
        procid=str(os.getpid()),
    )
    options = ForwarderOptions(
        batch_size=settings.batch_size,
        poll_interval_seconds=settings.poll_interval_seconds,
        retry_initial_seconds=settings.retry_initial_seconds,
        retry_max_seconds=settings.retry_max_seconds,
        utf8_bom=settings.utf8_bom,
        start_at=settings.start_at,
    )
    return AuditForwarder(database, ForwardCursor(cursor_file, fsync=fsync), connection, header, options, render=render)


def _local_hostname() -> str | None:
    """RFC 5424 §6.2.4 prefers the FQDN; a name with characters the header cannot carry becomes ``-``."""
    name = socket.getfqdn() or socket.gethostname()
    if name and len(name) <= 255 and all(33 <= ord(c) <= 126 for c in name):
        return name
    return None
