"""SQLAlchemy 2.0 typed models: the index of what we hold and the durable job queue.

The schema itself is owned by the Alembic migrations in ``storage/migrations``; these classes
describe it for the ORM. Tables of other parts (the audit log) declare themselves on the same
:class:`Base` so that one transaction can cover an action and its audit record (docs/architecture.md §6.8).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from storage.payload_subject import DeliverySubject


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores no zone; we restore it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC timestamps")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON}


class Patient(Base):
    """A patient as identified by PatientID within its issuer (PS3.3 C.7.1.1)."""

    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient_id_issuer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(324))
    birth_date: Mapped[str | None] = mapped_column(String(8))
    sex: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    # The console's study list: newest first, keyset-paged on (created_at, id) (storage/study_browser.py).
    __table_args__ = (Index("ix_study_created_at_id", "created_at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(64))
    referring_physician: Mapped[str | None] = mapped_column(String(324))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class InstanceOrigin(enum.StrEnum):
    RECEIVED = "received"
    GENERATED = "generated"


class Instance(Base):
    """One stored SOP instance: where its file is and how it arrived."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(300))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    origin: Mapped[str] = mapped_column(String(16), default=InstanceOrigin.RECEIVED)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # How often the content under this SOP Instance UID was replaced (dicom.on_conflict =
    # "replace"); results name the revision they judged (InferenceResult.source_revision).
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    series: Mapped[Series] = relationship(back_populates="instances")


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # dead-lettered: attempts exhausted or a permanent error


class Job(Base):
    """A unit of durable work. ``dedup_key`` makes enqueueing idempotent (one infer job per
    instance and model, however often the instance arrives)."""

    __tablename__ = "job"
    __table_args__ = (Index("ix_job_claim", "state", "run_after"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    dedup_key: Mapped[str] = mapped_column(String(200), unique=True)
    instance_pk: Mapped[int | None] = mapped_column(ForeignKey("instance.id"), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    # Lower runs first among runnable jobs: the SR's deliveries go ahead of the summary image's.
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column()
    locked_by: Mapped[str | None] = mapped_column(String(100))
    last_error: Mapped[str | None] = mapped_column(Text)
    # Set when the job was re-armed while it was running (see storage.jobs.rearm): on completion
    # it goes back to pending at this time instead of done, so no trigger is ever lost.
    rerun_after: Mapped[dt.datetime | None] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    instance: Mapped[Instance | None] = relationship()


# A study's HL7/FHIR deliveries are found by their subject ("study-result/<pk>"; storage/study_browser.py).
Index("ix_job_delivery_subject", DeliverySubject(Job.__table__.c.payload))


class ResultStatus(enum.StrEnum):
    OK = "ok"
    NOT_APPLICABLE = "not-applicable"
    FAILED = "failed"


class InferenceResult(Base):
    """The classifier's verdict on one revision of an instance for one model version (idempotent
    per instance, model version and revision; only the instance's current revision counts)."""

    __tablename__ = "inference_result"
    __table_args__ = (
        UniqueConstraint(
            "instance_pk", "model_id", "model_version", "source_revision", name="uq_result_instance_model_revision"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instance.id"), index=True)
    model_id: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    probability: Mapped[float | None] = mapped_column()
    label: Mapped[str | None] = mapped_column(String(32))
    threshold: Mapped[float | None] = mapped_column()
    timings_ms: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The class activation map (rows of floats): the summary image is drawn from it later, in
    # its own job, so that the SR does not wait for the picture.
    cam: Mapped[list[list[float]] | None] = mapped_column(JSON, nullable=True)
    sr_instance_pk: Mapped[int | None] = mapped_column(ForeignKey("instance.id"))
    sc_instance_pk: Mapped[int | None] = mapped_column(ForeignKey("instance.id"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    # The Instance.revision judged: a replaced image's earlier results stay as history.
    source_revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # PHI-free intensity statistics of the model input (inference/input_stats.py) for drift
    # monitoring (inference/drift.py); NULL for results made before migration 0013 and for
    # images not analysed.
    input_stats: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)

    instance: Mapped[Instance] = relationship(foreign_keys=[instance_pk])


class DeliveryOutcome(enum.StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"


class DeliveryAttempt(Base):
    """One try at sending something to a destination over a channel (the outbox's history).

    The delivery itself is a :class:`Job` of kind ``deliver`` (see :mod:`storage.outbox`); this
    table keeps every attempt of it (when, what the peer answered) so that an operator can see
    why a delivery is late or dead-lettered, whatever the channel. ``subject`` names what was
    carried (a SOP Instance UID on the ``dicom`` channel); ``peer_status`` is what the peer
    answered, in the channel's own terms (``0x0000`` for a DIMSE status, ``AA`` for an HL7 ACK),
    ``None`` when no answer came back.
    """

    __tablename__ = "delivery_attempt"
    # Deliveries per minute on the console (storage/throughput.py).
    __table_args__ = (Index("ix_delivery_attempt_finished_at", "finished_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(32))
    destination: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(200), index=True)
    started_at: Mapped[dt.datetime] = mapped_column()
    finished_at: Mapped[dt.datetime] = mapped_column()
    outcome: Mapped[str] = mapped_column(String(16))
    peer_status: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)


class RegisteredModel(Base):
    """A model package version that has judged images: what reports and the EHR say about the
    algorithm (the FHIR Device, the SR's algorithm identification) outlives the loaded package."""

    __tablename__ = "model"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_id_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(64))
    manufacturer: Mapped[str] = mapped_column(String(64))
    device_uid: Mapped[str] = mapped_column(String(64))
    intended_use: Mapped[str] = mapped_column(Text)
    threshold: Mapped[float] = mapped_column()
    registered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class StudyStatus(enum.StrEnum):
    """What a study result says; ``pending`` is never stored (it means "no result yet")."""

    PENDING = "pending"
    FINAL = "final"
    AMENDED = "amended"
    NOT_ANALYSED = "not-analysed"


class StudyResult(Base):
    """One version of the result of a whole study (docs/sr.md, "Study results").

    A study result is made when the study has been quiet for ``results.study_stable_seconds``;
    images that arrive later make a new version (``amended``). Versions are kept: the newest is
    the current one, the older ones are what the EHR was told before.
    """

    __tablename__ = "study_result"
    __table_args__ = (UniqueConstraint("study_pk", "version", name="uq_study_result_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(32))
    probability: Mapped[float | None] = mapped_column()
    threshold: Mapped[float | None] = mapped_column()
    images: Mapped[int] = mapped_column(Integer)
    analysed: Mapped[int] = mapped_column(Integer)
    # [{"reason": str, "images": int}, ...]: why images were not analysed, most frequent first.
    reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # The image result that decided the label (the highest probability), when one did.
    deciding_result_pk: Mapped[int | None] = mapped_column(ForeignKey("inference_result.id"))
    model_id: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    # A digest of the image results the version was made from: an unchanged study makes no new version.
    basis: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)

    study: Mapped[Study] = relationship()


# -- the FHIR projection (fhir_api; docs/fhir.md) ------------------------------------------------


class FhirResource(Base):
    """The current version of one FHIR resource we serve, as served (JSON with ``meta``).

    Resources are projections of the index and result tables, written by ``fhir_api``'s projection
    job whenever a study's results change, so that a read is one indexed row and a search one
    query over :class:`FhirSearchIndex`. ``id`` grows with each new logical resource (never with
    an update): a search's paging snapshot is "resources with ``id`` at most N", so pages stay
    stable while new reports arrive. ``digest`` is of the content without ``meta``: an unchanged
    projection makes no new version.
    """

    __tablename__ = "fhir_resource"
    __table_args__ = (
        UniqueConstraint("resource_type", "logical_id", name="uq_fhir_resource_type_id"),
        Index("ix_fhir_resource_type_updated", "resource_type", "last_updated", "id"),
        Index("ix_fhir_resource_type_date", "resource_type", "sort_date", "id"),
        Index("ix_fhir_resource_type_date_high", "resource_type", "sort_date_high", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(40))
    logical_id: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[dt.datetime] = mapped_column()
    # The resource's own date as a range [sort_date, sort_date_high) (DiagnosticReport/Observation
    # effective, ImagingStudy started, ServiceRequest authoredOn): `_sort=date` and the `date` filter
    # read these columns, so a date search is an index range scan, not a join on the search index.
    sort_date: Mapped[dt.datetime | None] = mapped_column()
    sort_date_high: Mapped[dt.datetime | None] = mapped_column()
    # The study whose projection wrote it (None for shared resources: Patient, Device, Subscription).
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    digest: Mapped[str] = mapped_column(String(64))
    content: Mapped[str] = mapped_column(Text)


class FhirResourceVersion(Base):
    """Every version of every resource, the current one included (``_history``, vread)."""

    __tablename__ = "fhir_resource_version"
    __table_args__ = (UniqueConstraint("resource_pk", "version_id", name="uq_fhir_resource_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_pk: Mapped[int] = mapped_column(ForeignKey("fhir_resource.id"))
    version_id: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[dt.datetime] = mapped_column()
    content: Mapped[str] = mapped_column(Text)


class FhirSearchIndex(Base):
    """One searchable value of the current version of a resource (replaced with each version).

    Token parameters (``identifier``, ``status``, ``code``) fill ``system``/``value``; reference
    parameters (``patient``, ``subject``, ``result``) ``value`` as ``Type/id``; string parameters
    ``value`` normalised (lower case, no accents); date parameters the range ``[low, high)``.
    """

    __tablename__ = "fhir_search_index"
    __table_args__ = (
        Index("ix_fhir_search_value", "resource_type", "param", "value", "system", "resource_pk"),
        Index("ix_fhir_search_date", "resource_type", "param", "low", "high", "resource_pk"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_pk: Mapped[int] = mapped_column(ForeignKey("fhir_resource.id"), index=True)
    resource_type: Mapped[str] = mapped_column(String(40))
    param: Mapped[str] = mapped_column(String(40))
    system: Mapped[str | None] = mapped_column(String(200))
    value: Mapped[str | None] = mapped_column(String(200))
    low: Mapped[dt.datetime | None] = mapped_column()
    high: Mapped[dt.datetime | None] = mapped_column()


# -- HL7 v2: orders, and the inbound message log (hl7; docs/hl7.md) ------------------------------


class ImagingOrder(Base):
    """An imaging order received from the RIS/EHR (ORM^O01 / OMI^O23): what the study was ordered as.

    Matched to studies by accession number, in either arrival order (there is no link column:
    ``study.accession_number = imaging_order.accession_number``). Identified by the placer order
    number within its namespace; later messages for the same order (XO change, CA cancel) update it.
    """

    __tablename__ = "imaging_order"
    __table_args__ = (UniqueConstraint("placer_namespace", "placer_order_number", name="uq_order_placer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    placer_order_number: Mapped[str] = mapped_column(String(64))
    placer_namespace: Mapped[str] = mapped_column(String(64), default="")
    filler_order_number: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    order_control: Mapped[str] = mapped_column(String(8))  # ORC-1 of the latest message: NW, XO, CA ...
    status: Mapped[str] = mapped_column(String(16))  # active, cancelled
    patient_id: Mapped[str] = mapped_column(String(64))
    patient_issuer: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str | None] = mapped_column(String(324))
    birth_date: Mapped[str | None] = mapped_column(String(8))
    sex: Mapped[str | None] = mapped_column(String(16))
    procedure_code: Mapped[str | None] = mapped_column(String(64))
    procedure_system: Mapped[str | None] = mapped_column(String(64))
    procedure_text: Mapped[str | None] = mapped_column(String(200))
    ordering_provider: Mapped[str | None] = mapped_column(String(324))
    priority: Mapped[str | None] = mapped_column(String(16))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sending_application: Mapped[str] = mapped_column(String(64))
    sending_facility: Mapped[str] = mapped_column(String(64))
    message_type: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Hl7InboundMessage(Base):
    """Every HL7 message we acknowledged, by sender and control id (MSH-3, MSH-4, MSH-10).

    A resent message (same sender, same control id) gets the same ACK back and changes nothing:
    HL7 v2.5.1 §2.9.2 original-mode acknowledgement, made idempotent. The ACK is stored in the
    transaction that stored the message's effect, so "ACK AA" always means "committed".
    """

    __tablename__ = "hl7_inbound_message"
    __table_args__ = (
        UniqueConstraint("sending_application", "sending_facility", "control_id", name="uq_hl7_inbound_control_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sending_application: Mapped[str] = mapped_column(String(64))
    sending_facility: Mapped[str] = mapped_column(String(64))
    control_id: Mapped[str] = mapped_column(String(199))
    message_type: Mapped[str] = mapped_column(String(16))
    ack_code: Mapped[str] = mapped_column(String(2))
    ack: Mapped[str] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DicomAssociationEnd(enum.StrEnum):
    """How an accepted association ended (dicom_node.listener.association_end's words)."""

    RELEASED = "released"  # A-RELEASE (PS3.8 7.2)
    ABORTED = "aborted"  # A-ABORT from either side, or the connection lost (A-P-ABORT, PS3.8 7.3, 7.4)
    CLOSED = "closed"  # the transport closed without either


class DicomAssociation(Base):
    """One accepted DICOM association, written once when it has ended (storage/associations.py).

    What an operator asks of associations — who, to which of our AE titles, from which address,
    how it ended, how long it took, how many instances it stored or had refused, over TLS or not,
    and which acceptor process served it — and nothing about the patients whose images it carried.
    Rejected associations are never written (a flood of them must not become database writes);
    they are audited as throttled Security Alerts. The source of ``pneumo_dicom_associations_total``
    and ``pneumo_dicom_association_seconds`` (storage/metrics.py).
    """

    __tablename__ = "dicom_association"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    # "end" is an SQL reserved word: a hand-written query would need to quote it.
    ended_by: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[dt.datetime] = mapped_column()
    ended_at: Mapped[dt.datetime] = mapped_column(index=True)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_refused: Mapped[int] = mapped_column(Integer, default=0)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    acceptor_host: Mapped[str] = mapped_column(String(255))
    acceptor_pid: Mapped[int] = mapped_column(Integer)
