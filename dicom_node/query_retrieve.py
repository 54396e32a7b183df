"""The Query/Retrieve domain service behind the C-FIND, C-MOVE and C-GET handlers.

Two information models (PS3.4 C.6): Study Root (STUDY, SERIES, IMAGE) and Patient Root
(PATIENT, STUDY, SERIES, IMAGE). Below PATIENT the two select the same entities with the same
keys (:mod:`storage.query`); the PATIENT level is :mod:`storage.patient_query`, and only the
Patient Root SOP Classes reach it — a Study Root identifier at PATIENT level is refused (0xA900).

Everything the Q/R SCP decides lives here, free of pynetdicom: which stored instances
an identifier selects (received images and our own SR/SC objects alike, since both are in the
same index), where a C-MOVE may send them, and the audit trail the IHE ATNA profile expects:

* every C-FIND is a PS3.15 A.5.3.12 Query event carrying the identifier as sent;
* every C-MOVE / C-GET is a A.5.3.2 Begin Transferring DICOM Instances event before the first
  C-STORE sub-operation and a A.5.3.5 DICOM Instances Transferred event (Action R: we re-send
  what we hold) with the outcome once the sub-operations are over.

C-MOVE destinations are the configured peers that have a port (PS3.4 C.4.2.1.4: the SCP must
know the destination AE's address; a title alone is not enough). Anything else is "Move
Destination unknown" — and is never resolved from the network, so a requestor cannot make us
push images to an address of its choosing. With ``[dicom.tls]`` on, the sub-association goes over
TLS (PS3.15 B.9; our listener speaks only TLS, so every peer of a TLS node is one): the peer's
certificate chain verified against ``ca_file``, ours presented as client certificate.
"""

from __future__ import annotations

import base64
import ssl
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy.exc import SQLAlchemyError

from audit.builders import application, begin_transferring, instances_transferred
from audit.builders import query as query_event
from audit.events import Action, ActiveParticipant, AuditEvent, AuditSource, Outcome, RoleId
from audit.store import append as append_audit
from conf.settings import DicomSettings
from dicom_node.errors import (
    IdentifierMismatchError,
    MoveDestinationUnknownError,
    QueryOutOfResourcesError,
    RetrieveOutOfResourcesError,
)
from dicom_node.ingest import Peer
from dicom_node.tls import outgoing_context
from storage import patient_query
from storage import query as index_query
from storage.db import Database
from storage.encryption import StoredFileIntegrityError
from storage.filestore import FileStore, FileStoreError
from storage.models import utcnow
from storage.query import QueryError, RetrieveMatch

log = structlog.get_logger(__name__)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
#: The SOP Classes of the Patient Root model: only these may query or retrieve at PATIENT level.
PATIENT_ROOT = frozenset({PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET})


def _patient_level(identifier: Dataset, sop_class_uid: str) -> bool:
    """Whether *identifier* is evaluated at the PATIENT level of the Patient Root model."""
    return sop_class_uid in PATIENT_ROOT and patient_query.is_patient_level(identifier)


@dataclass(frozen=True)
class MoveDestination:
    """A configured peer we may open an association to for C-MOVE sub-operations."""

    ae_title: str
    host: str
    port: int
    #: The client context of a TLS sub-association; None: plain TCP.
    tls_context: ssl.SSLContext | None = None

    def association_options(self) -> dict[str, Any]:
        """Keyword arguments of pynetdicom's ``AE.associate`` for the sub-association."""
        return {} if self.tls_context is None else {"tls_args": (self.tls_context, self.host)}


@dataclass
class SubOperationResults:
    """How the C-STORE sub-operations of one retrieve ended (PS3.4 C.4.2.3.1 / C.4.3.3.1)."""

    completed: list[str] = field(default_factory=list)
    warning: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: bool = False

    def record(self, sop_instance_uid: str, status: int) -> None:
        """File a C-STORE-RSP status: 0x0000 success, 0x0001/0xB0xx warning, else failure."""
        if status == 0x0000:
            self.completed.append(sop_instance_uid)
        elif status == 0x0001 or (status & 0xF000) == 0xB000:
            self.warning.append(sop_instance_uid)
        else:
            self.failed.append(sop_instance_uid)


class Transfer:
    """One prepared C-MOVE / C-GET: the matched instances, their destination, and the closing
    audit record. Produced by :meth:`QueryRetrieveService.retrieve`."""

    def __init__(
        self,
        service: QueryRetrieveService,
        matches: Sequence[RetrieveMatch],
        participants: tuple[ActiveParticipant, ActiveParticipant, tuple[ActiveParticipant, ...]],
        destination: MoveDestination | None,
    ) -> None:
        self._service = service
        self.matches: tuple[RetrieveMatch, ...] = tuple(matches)
        self.destination = destination
        self.participants = participants
        self._finished = False

    @property
    def sop_pairs(self) -> set[tuple[str, str]]:
        """(SOP Class UID, stored Transfer Syntax UID) pairs, for presentation contexts."""
        return {(match.sop_class_uid, match.transfer_syntax_uid) for match in self.matches}

    def datasets(self) -> Iterator[tuple[RetrieveMatch, Dataset | None]]:
        """Each matched instance read from the file store, in the stored encoding (no
        transcoding); ``None`` when its file cannot be read, which the caller reports as a
        failed sub-operation."""
        for match in self.matches:
            yield match, self._service.read_instance(match)

    def finish(self, results: SubOperationResults) -> None:
        """Write the A.5.3.5 Instances Transferred events (once), one per study."""
        if self._finished:
            return
        self._finished = True
        self._service.audit_transferred(self, results)


class QueryRetrieveService:
    """Study Root Query/Retrieve over the index and file store (PS3.4 C.4.1, C.4.2, C.4.3)."""

    def __init__(
        self,
        database: Database,
        store: FileStore,
        audit_source: AuditSource,
        settings: DicomSettings,
        *,
        local_host: str | None = None,
    ) -> None:
        self._db = database
        self._store = store
        self._audit_source = audit_source
        self._settings = settings
        self._local_host = local_host
        tls_context = outgoing_context(settings.tls) if settings.tls.enabled else None
        self._destinations = {
            peer.ae_title: MoveDestination(peer.ae_title, peer.host, peer.port, tls_context)
            for peer in settings.peers
            if peer.port is not None and peer.host
        }

    # -- C-FIND ---------------------------------------------------------------------------------

    def find(
        self,
        identifier: Dataset,
        requestor: Peer,
        *,
        sop_class_uid: str = STUDY_ROOT_FIND,
        encoded: bytes | None = None,
        transfer_syntax_uid: str = ExplicitVRLittleEndian,
    ) -> Iterator[Dataset]:
        """Evaluate a C-FIND identifier (PS3.4 C.4.1.3.1) and audit it (PS3.15 A.5.3.12).

        All matches are computed (and the audit committed) before the first one is returned,
        so a failure surfaces as one failure status rather than after some Pending responses,
        and the read transaction is not held open while the requestor reads the responses.
        *encoded* is the identifier as it arrived; it is what the audit record keeps.
        """
        if encoded is None:
            encoded, transfer_syntax_uid = _encode(identifier), ExplicitVRLittleEndian
        audit = _QueryAudit(self, requestor, sop_class_uid, encoded, transfer_syntax_uid, identifier)
        try:
            with self._db.read_session() as session:
                finder = patient_query.find_patients if _patient_level(identifier, sop_class_uid) else index_query.find
                responses = list(finder(session, identifier, retrieve_ae_title=self._settings.ae_title))
        except QueryError as exc:
            audit.write(Outcome.MINOR_FAILURE, str(exc))
            raise IdentifierMismatchError(str(exc)) from exc
        except SQLAlchemyError as exc:
            audit.write(Outcome.SERIOUS_FAILURE, f"index unavailable: {exc.__class__.__name__}", best_effort=True)
            raise QueryOutOfResourcesError(f"index unavailable: {exc.__class__.__name__}") from exc
        audit.write(Outcome.SUCCESS, None)
        log.info("dicom.find", level=str(identifier.get("QueryRetrieveLevel", "")), matches=len(responses))
        return iter(responses)

    # -- C-MOVE / C-GET -------------------------------------------------------------------------

    def move_destination(self, ae_title: str) -> MoveDestination:
        """The configured address of a C-MOVE destination, or 0xA801 (PS3.4 C.4.2.1.5)."""
        destination = self._destinations.get(ae_title.strip())
        if destination is None:
            raise MoveDestinationUnknownError(f"move destination {ae_title.strip()!r} is not a configured peer with a port")
        return destination

    def retrieve(
        self, identifier: Dataset, requestor: Peer, destination_ae: str | None = None, *, sop_class_uid: str = ""
    ) -> Transfer:
        """Select the instances of a C-MOVE (*destination_ae* given) or C-GET (the requestor is
        the destination) identifier and write the Begin Transferring audit records.
        *sop_class_uid* is the request's (Patient Root allows the PATIENT level).

        Raises :class:`MoveDestinationUnknownError`, :class:`IdentifierMismatchError` or
        :class:`RetrieveOutOfResourcesError`; the caller answers with their status.
        """
        destination = self.move_destination(destination_ae) if destination_ae is not None else None
        try:
            with self._db.read_session() as session:
                if _patient_level(identifier, sop_class_uid):
                    matches = patient_query.patient_retrieve_matches(session, identifier)
                else:
                    matches = index_query.retrieve_matches(session, identifier)
        except QueryError as exc:
            raise IdentifierMismatchError(str(exc)) from exc
        except SQLAlchemyError as exc:
            raise RetrieveOutOfResourcesError(f"index unavailable: {exc.__class__.__name__}") from exc

        source = self._audit_source
        ours = application(source, self._settings.ae_title, self._local_host, requestor=False, role=RoleId.SOURCE)
        if destination is None:  # C-GET: the requestor receives
            receiver = application(source, requestor.ae_title, requestor.address, requestor=True, role=RoleId.DESTINATION)
            others: tuple[ActiveParticipant, ...] = ()
        else:
            receiver = application(source, destination.ae_title, destination.host, requestor=False, role=RoleId.DESTINATION)
            others = (application(source, requestor.ae_title, requestor.address, requestor=True, role=None),)
        transfer = Transfer(self, matches, (ours, receiver, others), destination)
        now = utcnow()
        events = [
            begin_transferring(
                self._audit_source,
                source_participant=ours,
                destination_participant=receiver,
                other_participants=others,
                study_uid=group[0].study_instance_uid,
                sop_classes=dict(Counter(m.sop_class_uid for m in group)),
                instances=[m.sop_instance_uid for m in group],
                patient_id=group[0].patient_id,
                patient_name=group[0].patient_name,
                accession=group[0].accession_number,
                when=now,
            )
            for group in _by_study(matches)
        ]
        try:
            self._append(events)
        except SQLAlchemyError as exc:
            # No trail, no transfer: the audit record must exist before the first image leaves.
            raise RetrieveOutOfResourcesError(f"audit store unavailable: {exc.__class__.__name__}") from exc
        log.info(
            "dicom.retrieve",
            kind="move" if destination else "get",
            destination=destination.ae_title if destination else requestor.ae_title,
            instances=len(matches),
        )
        return transfer

    def read_instance(self, match: RetrieveMatch) -> Dataset | None:
        """The stored instance, authenticated and decrypted by the store; None (the sub-operation
        fails, PS3.4 C.4.2.3/C.4.3.3) when it cannot be read or fails authentication."""
        try:
            with self._store.open(match.path) as handle:
                return dcmread(handle)
        except (OSError, FileStoreError, InvalidDicomError, ValueError, StoredFileIntegrityError) as exc:
            log.error("dicom.retrieve.unreadable", error=exc.__class__.__name__, sop_class_uid=match.sop_class_uid)
            return None

    def audit_transferred(self, transfer: Transfer, results: SubOperationResults) -> None:
        ours, receiver, others = transfer.participants
        succeeded = set(results.completed) | set(results.warning)
        now = utcnow()
        events: list[AuditEvent] = []
        for group in _by_study(transfer.matches):
            sent = [m for m in group if m.sop_instance_uid in succeeded]
            failed = sum(1 for m in group if m.sop_instance_uid in set(results.failed))
            not_sent = len(group) - len(sent)
            if not_sent == 0:
                outcome = Outcome.SUCCESS
            elif sent:
                outcome = Outcome.MINOR_FAILURE
            else:
                outcome = Outcome.SERIOUS_FAILURE
            description = f"sent {len(sent)} of {len(group)}; failed {failed}" + ("; cancelled" if results.cancelled else "")
            events.append(
                instances_transferred(
                    self._audit_source,
                    action=Action.READ,
                    outcome=outcome,
                    source_participant=ours,
                    destination_participant=receiver,
                    other_participants=others,
                    study_uid=group[0].study_instance_uid,
                    sop_classes=dict(Counter(m.sop_class_uid for m in sent)),
                    instances=[m.sop_instance_uid for m in sent],
                    patient_id=group[0].patient_id,
                    patient_name=group[0].patient_name,
                    accession=group[0].accession_number,
                    when=now,
                    description=description,
                )
            )
        try:
            self._append(events)
        except SQLAlchemyError:
            log.error("audit.write_failed", event="instances-transferred")

    # -- helpers --------------------------------------------------------------------------------

    def _append(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        with self._db.session() as session:
            for event in events:
                append_audit(session, event)


@dataclass(frozen=True)
class _QueryAudit:
    """Builds and writes the A.5.3.12 Query record of one C-FIND."""

    service: QueryRetrieveService
    requestor: Peer
    sop_class_uid: str
    encoded: bytes
    transfer_syntax_uid: str
    identifier: Dataset

    def write(self, outcome: Outcome, description: str | None, *, best_effort: bool = False) -> None:
        service = self.service
        patient_id = str(self.identifier.get("PatientID", "") or "").strip()
        source = service._audit_source
        event = query_event(
            source,
            requestor=application(source, self.requestor.ae_title, self.requestor.address, requestor=True, role=None),
            responder=application(source, service._settings.ae_title, service._local_host, requestor=False),
            sop_class_uid=self.sop_class_uid,
            query_base64=base64.b64encode(self.encoded).decode("ascii"),
            transfer_syntax_uid=self.transfer_syntax_uid,
            outcome=outcome,
            when=utcnow(),
            patient_id=patient_id if patient_id and "*" not in patient_id and "?" not in patient_id else None,
            description=description,
        )
        try:
            service._append([event])
        except SQLAlchemyError as exc:
            if best_effort:
                log.error("audit.write_failed", event="query")
                return
            # Fail closed: an unaudited query must not be answered.
            raise QueryOutOfResourcesError(f"audit store unavailable: {exc.__class__.__name__}") from exc


def _by_study(matches: Sequence[RetrieveMatch]) -> list[list[RetrieveMatch]]:
    """Matches grouped per study, in first-seen order (one audit participant object each)."""
    groups: dict[str, list[RetrieveMatch]] = defaultdict(list)
    for match in matches:
        groups[match.study_instance_uid].append(match)
    return list(groups.values())


def _encode(identifier: Dataset) -> bytes:
    """Explicit VR Little Endian encoding of an identifier (when the raw bytes are not at hand)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, identifier)
    return buffer.getvalue()

