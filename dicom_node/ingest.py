"""Durable ingest of one received instance: the C-STORE guarantee of docs/architecture.md §3 step 2.

Order of work, chosen so that a crash at any point never leaves an acknowledged instance
missing and never acknowledges one that is not safe:

1. stage the received file (a hard link; hash and fsync start in the store's I/O threads);
   parse the header, check it matches the request and that its pixel data is whole
   (nothing placed yet);
2. take the store's lock for the SOP Instance UID (:meth:`FileStore.uid_lock`, across threads
   and acceptor processes) and look the UID up to spot duplicates;
3. rename the staged file into place and fsync the directory (unless policy keeps the stored
   copy) — the disk work was waited for before the lock, so slow disks do not serialise
   associations;
4. one transaction: index rows + ``infer`` job + audit record; commit; release the lock;
5. only then does the caller answer Success.

A crash after 3 and before 4 leaves a file with no row (or, for a replace, new bytes under the
old hash); the peer got no Success and will resend, which overwrites it and commits its hash.
A crash after 4 loses nothing.

Replace (``dicom.on_conflict = "replace"``, different bytes under a stored SOP Instance UID): the
transaction of step 4 also refreshes every header-derived index field, counts a new revision of
the instance, puts its ``infer`` job back to pending and arms its study's result job
(:func:`storage.study_results.schedule_rejudgement`). So the same model version judges the new
content, the results of the old content stop counting, and the new SR / summary image (new UIDs)
and the amended study result go out on every channel — or, if the commit fails, none of it
happened and the old file is back. The same bytes again stay a no-op.

Because 2-4 hold the UID lock, when several associations send one SOP Instance UID with
different bytes at once exactly one decides what the file becomes and commits its hash; the
others see its row and follow ``dicom.on_conflict`` — the file on disk always has the indexed
hash. A replace whose commit fails puts the stored copy back (:meth:`FileStore.set_aside`).

Statuses (PS3.4 B.2.3): a data set that cannot be parsed — a length overrunning its container,
an undefined-length sequence never closed, trailing bytes, pixel data truncated or malformed:
the structural walk of the whole file in :mod:`dicom_node.dataset_check` — is 0xC210 Cannot
Understand, never 0xA700: a sender retries "Out of Resources" forever, and retrying bytes we
cannot read will not help. 0xA700 is kept for what may clear: a full disk (or free space below
``storage.min_free_mb``), an unavailable database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from audit.builders import dicom_transfer
from audit.events import Action, AuditEvent, AuditSource, Outcome
from audit.store import append as append_audit
from dicom_node.dataset_check import check_dataset
from dicom_node.errors import (
    CannotUnderstandError,
    MissingIdentifiersError,
    OutOfResourcesError,
    SopClassMismatchError,
    SopInstanceMismatchError,
    StoreError,
)
from storage.db import Database
from storage.filestore import FileStore, FileStoreError, StagedFile, StoredFile
from storage.index import add_instance, find_instance, replace_instance
from storage.job_kinds import INFER_JOB, infer_job_key
from storage.jobs import enqueue
from storage.metadata import InstanceMetadata, MetadataError, extract_metadata
from storage.models import InstanceOrigin, utcnow
from storage.study_results import schedule_rejudgement
from storage.tracing import NOOP_TRACER, Span, Tracer, with_traceparent

log = structlog.get_logger(__name__)


class RateLimitedLog:
    """At most one log line per *interval* seconds for a failure that repeats at a peer's retry
    rate (a full disk, an unwritable audit log); the line counts what was held back.

    Thread-safe; one instance per kind of repeating failure."""

    def __init__(self, event: str, *, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._event = event
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next = float("-inf")
        self._suppressed = 0

    def error(self, **fields: object) -> bool:
        """Log *fields* as an error unless a line went out less than *interval* ago; say whether it did."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._suppressed += 1
                return False
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval
        log.error(self._event, suppressed=suppressed, interval_s=self._interval, **fields)
        return True


class IngestResult(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same UID, same bytes: nothing to do
    KEPT_EXISTING = "kept-existing"  # same UID, different bytes, policy "keep"
    REPLACED = "replaced"  # same UID, different bytes, policy "replace"


@dataclass(frozen=True)
class Peer:
    ae_title: str
    address: str
    port: int


@dataclass(frozen=True)
class ReceivedInstance:
    """What arrived: the Part 10 file written by the network layer and the request's claims."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling: Peer
    called_ae: str


class Ingestor:
    """Turns a received file into an indexed, queued, audited instance — or a typed error."""

    def __init__(
        self,
        database: Database,
        store: FileStore,
        audit_source: AuditSource,
        *,
        local_host: str | None,
        on_conflict: str = "keep",
        on_queued: Callable[[], None] | None = None,
        tracer: Tracer = NOOP_TRACER,
    ) -> None:
        """*tracer*: the ``dicom.c-store`` span of each instance, whose ``traceparent`` its
        ``infer`` job carries (:mod:`storage.tracing`)."""
        self._db = database
        self._store = store
        self._audit_source = audit_source
        self._local_host = local_host
        self._on_conflict = on_conflict
        self._on_queued = on_queued or (lambda: None)
        self._tracer = tracer
        self._audit_failed_log = RateLimitedLog("audit.write_failed")
        #: Refusals for lack of resources repeat at the sender's retry rate (a PACS retries "Out of
        #: Resources" for ever): one error line per interval, with the count held back.
        self.resources_log = RateLimitedLog("dicom.store.out_of_resources")

    def ingest(self, received: ReceivedInstance) -> IngestResult:
        """Store *received* durably; raises a :class:`StoreError` (already audited) otherwise."""
        with self._tracer.span("dicom.c-store", attributes=self._span_attributes(received)) as span:
            try:
                result = self._ingest(received, span)
            except StoreError as exc:
                span.set_attribute("dicom.status", f"0x{exc.status:04X}")
                self._audit_failure(received, exc)
                raise
            span.set_attribute("dicom.store.result", str(result))
            return result

    def _span_attributes(self, received: ReceivedInstance) -> dict[str, str | int] | None:
        """What the ``dicom.c-store`` span says: classes, syntax, size and AE titles — no UIDs of
        the instance or its study, nothing from the data set (:mod:`storage.tracing`)."""
        if not self._tracer.enabled:
            return None
        attributes: dict[str, str | int] = {
            "dicom.sop_class_uid": received.sop_class_uid,
            "dicom.transfer_syntax_uid": received.transfer_syntax_uid,
            "dicom.calling_ae": received.calling.ae_title,
            "dicom.called_ae": received.called_ae,
        }
        with contextlib.suppress(OSError):
            attributes["dicom.size_bytes"] = received.path.stat().st_size
        return attributes

    def refuse(self, received: ReceivedInstance, exc: StoreError) -> None:
        """Audit a C-STORE refused before ingest could start (the network layer could not write
        the data set: disk full). Best effort, like every failure record."""
        self._audit_failure(received, exc)

    def _ingest(self, received: ReceivedInstance, span: Span) -> IngestResult:
        # Staging first: the file's hash and fsync then run in the store's I/O threads while
        # this thread parses the header.
        try:
            staged = self._store.stage_copy(received.path)
        except OSError as exc:
            raise OutOfResourcesError(f"cannot stage file: {exc.strerror}") from exc
        try:
            meta = self._read_header(received)
            relative_path = self._store.relative_path(
                meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid
            )
            try:
                staged.wait()  # never wait for the disk while holding the UID lock
            except OSError as exc:
                raise OutOfResourcesError(f"cannot stage file: {exc.strerror}") from exc
            with self._store.uid_lock(meta.sop_instance_uid):
                try:
                    with self._db.read_session() as session:
                        existing = find_instance(session, meta.sop_instance_uid)
                        stored_as = (existing.sha256, existing.path) if existing is not None else None
                except SQLAlchemyError as exc:
                    raise OutOfResourcesError(f"database unavailable: {exc.__class__.__name__}") from exc
                if stored_as is not None:
                    return self._handle_existing(received, meta, staged, stored_as, relative_path)
                return self._store_new(received, meta, staged, relative_path, span.traceparent)
        finally:
            self._store.discard(staged)  # no-op once committed (renamed away)

    # -- steps -------------------------------------------------------------------------------

    def _read_header(self, received: ReceivedInstance) -> InstanceMetadata:
        """Parse the header, check it against the request, then walk the whole file's structure
        (:func:`check_dataset`: every element and item header, PS3.5 §7, A.4).

        Whatever pydicom raises while parsing bytes the peer sent means we cannot understand
        them (0xC210; e.g. an undefined-length sequence never closed ends in an ``OSError``
        without an errno, "No tag to read"). Only an ``OSError`` with an errno is our own I/O
        failing, which may clear (0xA700)."""
        try:
            with received.path.open("rb") as fp:
                try:
                    ds = dcmread(fp, stop_before_pixels=True)
                except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError) as exc:
                    raise CannotUnderstandError(f"dataset cannot be decoded: {exc.__class__.__name__}") from exc
                except OSError as exc:
                    if exc.errno is not None:
                        raise
                    raise CannotUnderstandError(f"dataset cannot be decoded: {exc.__class__.__name__}") from exc
                except Exception as exc:  # noqa: BLE001 - any other parser failure is about the bytes
                    raise CannotUnderstandError(f"dataset cannot be decoded: {exc.__class__.__name__}") from exc
                try:
                    meta = extract_metadata(ds)
                except MetadataError as exc:
                    raise MissingIdentifiersError(str(exc)) from exc
                except Exception as exc:  # a damaged element discovered while reading values
                    raise CannotUnderstandError(f"dataset cannot be decoded: {exc.__class__.__name__}") from exc
                if meta.sop_class_uid != received.sop_class_uid:
                    raise SopClassMismatchError("SOP Class UID in the dataset differs from the request")
                if meta.sop_instance_uid != received.sop_instance_uid:
                    raise SopInstanceMismatchError("SOP Instance UID in the dataset differs from the request")
                check_dataset(fp, ds)
        except OSError as exc:
            raise OutOfResourcesError(f"cannot read the received file: {exc.strerror}") from exc
        return meta

    def _store_new(
        self, received: ReceivedInstance, meta: InstanceMetadata, staged: StagedFile, relative_path: str,
        traceparent: str | None = None,
    ) -> IngestResult:
        stored = self._commit_file(staged, relative_path)
        now = utcnow()
        try:
            with self._db.session() as session:
                instance = add_instance(
                    session,
                    meta,
                    transfer_syntax_uid=received.transfer_syntax_uid,
                    relative_path=stored.relative_path,
                    size=stored.size,
                    sha256=stored.sha256,
                    origin=InstanceOrigin.RECEIVED,
                    calling_ae=received.calling.ae_title,
                    received_at=now,
                )
                enqueue(session, INFER_JOB, infer_job_key(meta.sop_instance_uid), instance_pk=instance.id,
                        payload=with_traceparent({}, traceparent))
                append_audit(session, self._transfer_event(received, meta, Action.CREATE, Outcome.SUCCESS, now))
        except IntegrityError as exc:
            # Unreachable for our own writers (all hold the UID lock); kept for a writer that
            # inserts the same SOP Instance UID without it.
            with self._db.read_session() as session:
                winner = find_instance(session, meta.sop_instance_uid)
            if winner is not None and winner.sha256 == stored.sha256:
                return IngestResult.DUPLICATE
            raise OutOfResourcesError("concurrent store of the same SOP Instance UID with other content") from exc
        except (OperationalError, SQLAlchemyError) as exc:
            # The row never committed: the file we placed must not masquerade as stored.
            with contextlib.suppress(OSError):
                self._store.absolute(relative_path).unlink()
            raise OutOfResourcesError(f"database unavailable: {exc.__class__.__name__}") from exc
        self._on_queued()
        return IngestResult.STORED

    def _handle_existing(
        self,
        received: ReceivedInstance,
        meta: InstanceMetadata,
        staged: StagedFile,
        stored_as: tuple[str, str],
        relative_path: str,
    ) -> IngestResult:
        existing_sha, existing_path = stored_as
        now = utcnow()
        if staged.sha256 == existing_sha:
            result, action, outcome, note = IngestResult.DUPLICATE, Action.READ, Outcome.SUCCESS, "duplicate of a stored instance"
        elif self._on_conflict == "replace":
            result, action, outcome = IngestResult.REPLACED, Action.UPDATE, Outcome.SUCCESS
            note = "replaced stored instance with different content"
        else:
            result, action, outcome, note = (
                IngestResult.KEPT_EXISTING, Action.READ, Outcome.MINOR_FAILURE,
                "different content for a stored SOP Instance UID; kept the stored copy (policy keep)",
            )
        # Replace: the stored copy stays reachable until the new hash commits, so a failed
        # commit puts it back and the file keeps matching the index.
        try:
            previous = self._store.set_aside(relative_path) if result is IngestResult.REPLACED else None
        except FileStoreError as exc:
            raise OutOfResourcesError(str(exc)) from exc
        try:
            stored = self._commit_file(staged, relative_path) if result is IngestResult.REPLACED else None
            self._update_existing(received, meta, stored, action, outcome, now, note, previous, relative_path)
        finally:
            if previous is not None:
                self._store.discard_path(previous)
        if stored is not None:
            if existing_path != relative_path:  # it moved to another study/series: drop the old copy
                with contextlib.suppress(OSError, FileStoreError):
                    self._store.absolute(existing_path).unlink()
            self._on_queued()
        log.info("dicom.store.existing", result=str(result), sop_class_uid=meta.sop_class_uid)
        return result

    def _update_existing(
        self,
        received: ReceivedInstance,
        meta: InstanceMetadata,
        stored: StoredFile | None,
        action: Action,
        outcome: Outcome,
        now: dt.datetime,
        note: str,
        previous: Path | None,
        relative_path: str,
    ) -> None:
        try:
            with self._db.session() as session:
                if stored is not None:
                    instance = find_instance(session, meta.sop_instance_uid)
                    if instance is not None:
                        studies = replace_instance(
                            session, instance, meta,
                            transfer_syntax_uid=received.transfer_syntax_uid, relative_path=stored.relative_path,
                            size=stored.size, sha256=stored.sha256, calling_ae=received.calling.ae_title, when=now,
                        )
                        schedule_rejudgement(session, instance, studies)
                append_audit(session, self._transfer_event(received, meta, action, outcome, now, note))
        except SQLAlchemyError as exc:
            if stored is not None:
                with contextlib.suppress(OSError, FileStoreError):
                    if previous is not None:
                        self._store.restore(previous, relative_path)
                    else:  # new bytes at a path nothing indexed points to
                        self._store.absolute(relative_path).unlink()
            raise OutOfResourcesError(f"database unavailable: {exc.__class__.__name__}") from exc

    def _audit_failure(self, received: ReceivedInstance, exc: StoreError) -> None:
        """Record a refused C-STORE. Best effort: when the database itself is the problem the
        record cannot be written, and the failure status to the peer is what matters."""
        study_uid = "unknown"
        with contextlib.suppress(Exception):
            ds = dcmread(received.path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            study_uid = str(ds.get("StudyInstanceUID", "unknown"))[:64] or "unknown"
        event = dicom_transfer(
            self._audit_source,
            action=Action.CREATE,
            outcome=Outcome.SERIOUS_FAILURE,
            sender=(received.calling.ae_title, received.calling.address),
            receiver=(received.called_ae, self._local_host),
            sender_is_requestor=True,
            study_uid=study_uid,
            sop_classes={received.sop_class_uid: 1},
            instances=(received.sop_instance_uid,),
            patient_id="",
            patient_name=None,
            when=utcnow(),
            description=f"refused with status 0x{exc.status:04X}: {exc}"[:500],
        )
        try:
            with self._db.session() as session:
                append_audit(session, event)
        except SQLAlchemyError:
            # Repeats at the peer's retry rate when the disk is full: one line per interval.
            self._audit_failed_log.error(event_id=event.event_id.code)

    def _commit_file(self, staged: StagedFile, relative_path: str) -> StoredFile:
        """Place new bytes at *relative_path*, refusing below the free-space floor (0xA700)."""
        try:
            self._store.require_space()
            return self._store.commit(staged, relative_path)
        except FileStoreError as exc:
            raise OutOfResourcesError(str(exc)) from exc

    def _transfer_event(
        self,
        received: ReceivedInstance,
        meta: InstanceMetadata,
        action: Action,
        outcome: Outcome,
        when: dt.datetime,
        description: str | None = None,
    ) -> AuditEvent:
        return dicom_transfer(
            self._audit_source,
            action=action,
            outcome=outcome,
            sender=(received.calling.ae_title, received.calling.address),
            receiver=(received.called_ae, self._local_host),
            sender_is_requestor=True,
            study_uid=meta.study_instance_uid,
            sop_classes={meta.sop_class_uid: 1},
            instances=(meta.sop_instance_uid,),
            patient_id=meta.patient_id,
            patient_name=meta.patient_name,
            accession=meta.accession_number,
            when=when,
            description=description,
        )
