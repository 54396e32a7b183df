"""The outbox's ``hl7`` channel: one ORU^R01 per study result version, sent over MLLP (docs/hl7.md).

The subject of a delivery is ``study-result/<pk>``. :meth:`Hl7ResultChannel.load` reads the study
result with its study, patient, matched order (by accession; the newest active one) and model,
and :func:`hl7.messages.build_oru` writes the message. Everything in it is derived from stored
rows — MSH-10 from the study result's key, MSH-7 from its creation time — so a re-send after a
crash is byte-for-byte the same message under the same control id, which the EHR recognises
(HL7 v2.5.1 2.10.1): never one result twice under different control ids.

OBR-25: version 1 ``F``; a later version ``C`` (corrected after a late image); a study nothing
could be analysed in ``X``, with the reasons. Demographics: the matched order's patient
identifier (the EHR's own), with the name, birth date and sex of the patient as the gateway holds
them (kept current by ADT^A08/A40), else the DICOM headers.

ACK handling (original mode, HL7 v2.5.1 2.9.2): AA/CA delivered; AE/CE and no answer (timeout,
refused, closed, a failed TLS handshake) retried with backoff; AR/CR dead-lettered at once.

TLS: a destination with ``tls = true`` is reached over TLS with :func:`tls_context` (built once,
at start, so a missing CA file fails ``pneumo serve`` instead of every delivery).
"""

from __future__ import annotations

import datetime as dt
import ssl

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.builders import patient_object, study_object
from audit.events import Action, ActiveParticipant, AuditEvent, AuditSource, EventId, Outcome, RoleId
from conf.errors import NotFoundError
from conf.settings import Hl7Destination, Hl7Settings
from conf.tls import client_context
from hl7.messages import Hl7MessageError, OruInput, PatientIdentity, build_oru, parse_ack
from hl7.mllp import MllpClient, MllpError
from storage.jobs import ClaimedJob
from storage.models import (
    ImagingOrder,
    InferenceResult,
    Instance,
    Patient,
    RegisteredModel,
    Series,
    Study,
    StudyResult,
    StudyStatus,
)
from storage.outbox import Channel, DeliveryFailedError, DeliveryItem, DeliveryReceipt

_STATUS = {StudyStatus.NOT_ANALYSED: "X"}


def control_id(study_result_pk: int) -> str:
    """MSH-10 of the ORU for one study result version: stable across re-sends, at most 20 characters."""
    return f"PNR{study_result_pk}"[:20]


def _observation_time(study: Study) -> dt.datetime | None:
    """The study's date and time as an aware datetime (DICOM has no zone: read as UTC), or None."""
    if not study.study_date:
        return None
    text = study.study_date + (study.study_time or "000000").split(".")[0].ljust(6, "0")[:6]
    try:
        return dt.datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def _order(session: Session, accession: str | None) -> ImagingOrder | None:
    if not accession:
        return None
    orders = session.execute(
        select(ImagingOrder).where(ImagingOrder.accession_number == accession).order_by(ImagingOrder.updated_at.desc())
    ).scalars().all()
    return next((o for o in orders if o.status == "active"), orders[0] if orders else None)


def _model(session: Session, result: StudyResult) -> RegisteredModel:
    query = select(RegisteredModel)
    if result.model_id is not None:
        query = query.where(RegisteredModel.model_id == result.model_id, RegisteredModel.version == result.model_version)
    found = session.execute(query.order_by(RegisteredModel.registered_at.desc()).limit(1)).scalar_one_or_none()
    if found is None:
        raise NotFoundError("no classifier model is registered: the result cannot name its algorithm")
    return found


def _sr_uids(session: Session, study_pk: int, made_before: dt.datetime) -> tuple[str, ...]:
    """The SRs the study result made at *made_before* stood on: per image, the SR of the newest
    revision judged by then (an image re-stored with other content has an older SR, now history)."""
    report = Instance.__table__.alias("report")
    rows = session.execute(
        select(InferenceResult.instance_pk, report.c.sop_instance_uid)
        .join(Instance, InferenceResult.instance_pk == Instance.id)
        .join(Series, Instance.series_pk == Series.id)
        .join(report, InferenceResult.sr_instance_pk == report.c.id)
        .where(Series.study_pk == study_pk, InferenceResult.created_at <= made_before)
        .order_by(InferenceResult.instance_pk, InferenceResult.source_revision, InferenceResult.id)
    ).all()
    newest = {instance_pk: sr_uid for instance_pk, sr_uid in rows}  # the last row of each image wins
    return tuple(newest.values())


def oru_input(session: Session, study_result_pk: int, destination: Hl7Destination, settings: Hl7Settings) -> OruInput:
    """The ORU^R01 of study result *study_result_pk* for *destination* (reads the database only)."""
    result = session.get(StudyResult, study_result_pk)
    if result is None:
        raise NotFoundError(f"study result {study_result_pk} is not stored")
    study = session.get(Study, result.study_pk)
    patient = session.get(Patient, study.patient_pk) if study is not None else None
    if study is None or patient is None:
        raise NotFoundError(f"the study of study result {study_result_pk} is not in the index")
    order = _order(session, study.accession_number)
    model = _model(session, result)
    status = _STATUS.get(StudyStatus(result.status), "F" if result.version == 1 else "C")
    identity = PatientIdentity(
        patient_id=order.patient_id if order else patient.patient_id,
        issuer=(order.patient_issuer if order else patient.issuer) or None,
        name=patient.name or (order.patient_name if order else None),
        birth_date=patient.birth_date or (order.birth_date if order else None),
        sex=patient.sex or (order.sex if order else None),
    )
    analysed = status != "X"
    placer = order if order is not None and order.placer_namespace != "accession" else None  # keyed by accession only
    label = result.label if analysed and result.label in ("PNEUMONIA", "NORMAL") else None
    return OruInput(
        control_id=control_id(result.id),
        sending_application=settings.sending_application, sending_facility=settings.sending_facility,
        receiving_application=destination.receiving_application, receiving_facility=destination.receiving_facility,
        created_at=result.created_at,
        patient=identity,
        placer_order_number=placer.placer_order_number if placer else None,
        placer_namespace=(placer.placer_namespace or None) if placer else None,
        filler_order_number=(order.filler_order_number if order else None)
        or (None if study.accession_number else f"PN{study.id}"),
        accession_number=study.accession_number or (order.accession_number if order else None),
        procedure_code=order.procedure_code if order else None,
        procedure_system=order.procedure_system if order else None,
        procedure_text=order.procedure_text if order else None,
        ordering_provider=order.ordering_provider if order else None,
        study_instance_uid=study.study_instance_uid,
        observation_datetime=_observation_time(study),
        result_status=status,  # type: ignore[arg-type]
        label=label,  # type: ignore[arg-type]
        probability=result.probability if analysed else None,
        threshold=result.threshold if result.threshold is not None else model.threshold,
        model_name=model.name, model_version=model.version, intended_use=model.intended_use,
        reasons=tuple(str(r.get("reason", "")) + f" ({r.get('images', 0)} image(s))" for r in (result.reasons or [])),
        images=result.images, analysed=result.analysed,
        sr_sop_instance_uids=_sr_uids(session, study.id, result.created_at) if analysed else (),
        processing_id=settings.processing_ids[0],
    )


def tls_context(settings: Hl7Settings) -> ssl.SSLContext:
    """The context of our MLLP connections to ``tls = true`` destinations
    (:func:`conf.tls.client_context` of ``[hl7.tls]``, BCP 195).

    The EHR's certificate is verified against ``[hl7.tls] ca_file`` (the system trust store
    without one) **and its host name is checked** against the destination's ``host``: HL7
    interface engines are usually addressed by DNS name, and with the check a certificate that
    the same CA issued to another host cannot stand in for the EHR (RFC 9110 4.3.4 / RFC 6125
    identity check; DICOM peers, addressed by IP, skip it). A destination addressed by IP needs
    that IP in the certificate's subjectAltName. Our ``cert_file`` is presented as client
    certificate when set (the EHR's listener may require it: mutual TLS, IHE ATNA)."""
    return client_context(settings.tls, check_hostname=True)


class Hl7ResultChannel:
    """:class:`~storage.outbox.ChannelSender` for ORU^R01 over MLLP to ``[[hl7.destinations]]``."""

    channel = Channel.HL7.value

    def __init__(self, settings: Hl7Settings, audit_source: AuditSource, client: MllpClient | None = None) -> None:
        self._settings = settings
        self._destinations = {d.name: d for d in settings.destinations}
        self._audit_source = audit_source
        self._client = client or MllpClient()
        self._tls = tls_context(settings) if any(d.tls for d in settings.destinations) else None

    def has_destination(self, name: str) -> bool:
        return name in self._destinations

    def load(self, session: Session, job: ClaimedJob, subject: str) -> DeliveryItem:
        kind, _, pk = subject.partition("/")
        if kind != "study-result" or not pk.isdigit():
            raise NotFoundError(f"the hl7 channel carries study results, not {subject!r}")
        destination = self._destinations.get(str(job.payload.get("destination", "")))
        if destination is None:
            # has_destination refuses it next; build with a placeholder receiver so the refusal is recorded.
            destination = Hl7Destination(name="?", host="-", port=1, receiving_application="", receiving_facility="")
        message = oru_input(session, int(pk), destination, self._settings)
        study = session.execute(select(Study).where(Study.study_instance_uid == message.study_instance_uid)).scalar_one()
        patient = session.get(Patient, study.patient_pk)
        return DeliveryItem(
            subject=subject, content=message, study_uid=study.study_instance_uid,
            patient_id=patient.patient_id if patient else message.patient.patient_id,
            patient_name=patient.name if patient else None, accession=study.accession_number,
        )

    def send(self, item: DeliveryItem, destination: str) -> DeliveryReceipt:
        target = self._destinations[destination]
        message: OruInput = item.content
        try:
            reply = self._client.send(target.host, target.port, build_oru(message),
                                      timeout=self._settings.ack_timeout_seconds,
                                      ssl_context=self._tls if target.tls else None)
        except MllpError as exc:
            raise DeliveryFailedError(f"MLLP: {exc}", retryable=True) from exc
        try:
            code, acked_id, error_text = parse_ack(reply)
        except Hl7MessageError as exc:
            raise DeliveryFailedError(f"the reply is not an HL7 ACK: {exc}", retryable=True) from exc
        if acked_id is not None and acked_id != message.control_id:
            raise DeliveryFailedError("the ACK answers another message (MSA-2)", retryable=True, peer_status=code)
        if code in ("AA", "CA"):
            return DeliveryReceipt(peer_status=code, details={"control_id": message.control_id})
        detail = f"EHR answered {code}" + (f": {error_text[:200]}" if error_text else "")
        raise DeliveryFailedError(detail, retryable=code in ("AE", "CE"), peer_status=code)

    def audit_event(
        self, item: DeliveryItem, destination: str, outcome: Outcome, when: dt.datetime, description: str | None
    ) -> AuditEvent:
        """PS3.15 A.5.3.6 Export: the result (PHI) left for the EHR's interface engine."""
        message: OruInput = item.content
        target = self._destinations.get(destination)
        return AuditEvent(
            event_id=EventId.EXPORT, action=Action.READ, outcome=outcome,
            outcome_description=(description or f"ORU^R01 {message.control_id} ({message.result_status})")[:1000],
            occurred_at=when, source=self._audit_source,
            participants=(
                ActiveParticipant(user_id=f"{message.sending_application}@{message.sending_facility}", user_is_requestor=True,
                                  role_id=RoleId.SOURCE),
                ActiveParticipant(user_id=f"{message.receiving_application}@{message.receiving_facility}",
                                  alternative_user_id=f"{target.host}:{target.port}" if target else None,
                                  user_is_requestor=False, role_id=RoleId.DESTINATION),
            ),
            objects=(patient_object(item.patient_id, item.patient_name),
                     study_object(item.study_uid, {}, (), item.accession)),
        )

