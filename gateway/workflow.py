"""The workflow of one received image (DESIGN.md §3 steps 3-5): the ``infer`` and ``summary``
job handlers.

``infer``: stored instance -> applicability -> classifier -> result row -> SR stored as our own
instance -> one delivery job per configured destination (+ a ``summary`` job) -> audit -> job
done, all committed in one transaction.

``summary``: result row -> Secondary Capture with the heat map -> stored, delivered, audited.
It is a job of its own so that the SR — the report radiologists read — never waits for the
picture (drawing it costs more than building the SR).

Generated files are placed before their transaction commits. Their UIDs derive from (source SOP
Instance UID, model id, model version), so a job that runs twice — because its worker died after
placing files but before committing — rewrites the same files under the same UIDs and never
creates a second report.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
import structlog
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.builders import ai_processing
from audit.events import Action, AuditEvent, AuditSource, Outcome
from audit.store import append as append_audit
from conf.settings import Settings
from dicom_node.ai_result import AiResult, ResultObjectError
from dicom_node.ingest import INFER_JOB
from dicom_node.sr import build_ai_sr
from dicom_node.summary_image import build_summary_image
from gateway.delivery import enqueue_deliveries
from gateway.worker import LeaseLostError, PermanentJobError
from inference.applicability import ApplicabilityRules
from inference.engine import InferenceEngine
from inference.errors import PreprocessingError
from inference.pipeline import classify_dataset
from inference.preprocess import display_image
from storage import jobs
from storage.db import Database
from storage.filestore import FileStore, StagedFile
from storage.index import add_instance, find_instance
from storage.jobs import ClaimedJob
from storage.metadata import InstanceMetadata, extract_metadata
from storage.models import InferenceResult, Instance, InstanceOrigin, ResultStatus, utcnow

log = structlog.get_logger(__name__)

SUMMARY_JOB = "summary"
#: Longest side of the image drawn in the summary Secondary Capture.
SUMMARY_MAX_SIDE = 1024


@dataclass(frozen=True)
class GeneratedObject:
    dataset: Dataset
    staged: StagedFile
    relative_path: str
    size: int


@dataclass(frozen=True)
class Verdict:
    """What one run of the classifier concluded, as stored in the result row."""

    status: ResultStatus
    reason: str | None = None
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    cam: list[list[float]] | None = None
    timings_ms: dict[str, float] | None = None


def summary_job_key(sop_instance_uid: str, model_id: str, model_version: str) -> str:
    return f"{SUMMARY_JOB}:{sop_instance_uid}:{model_id}:{model_version}"


def encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class InferenceWorkflow:
    """Handler for ``infer`` and ``summary`` jobs (see :data:`gateway.worker.JobHandler`)."""

    def __init__(
        self,
        database: Database,
        store: FileStore,
        engine: InferenceEngine,
        settings: Settings,
        *,
        rules: ApplicabilityRules | None = None,
        audit_source: AuditSource,
        on_reports_queued: Callable[[], None] | None = None,
        on_summary_queued: Callable[[], None] | None = None,
    ) -> None:
        self._db = database
        self._store = store
        self._engine = engine
        self._settings = settings
        self._rules = rules
        self._audit_source = audit_source
        self._application_id = f"{settings.dicom.ae_title}/inference"
        self._on_reports_queued = on_reports_queued or (lambda: None)
        self._on_summary_queued = on_summary_queued or (lambda: None)

    def __call__(self, job: ClaimedJob, worker_id: str) -> None:
        if job.kind == INFER_JOB:
            self._infer(job, worker_id)
        elif job.kind == SUMMARY_JOB:
            self._summary(job, worker_id)
        else:
            raise PermanentJobError(f"not a workflow job: {job.kind}")

    # -- infer ---------------------------------------------------------------------------------

    def _infer(self, job: ClaimedJob, worker_id: str) -> None:
        instance = self._instance(job)
        if self._result(instance.id) is not None:  # this model version already judged it
            self._complete_only(job, worker_id)
            return
        source = pydicom.dcmread(self._store.absolute(instance.path))
        meta = extract_metadata(source)
        try:
            outcome = classify_dataset(source, self._engine, self._rules)
        except PreprocessingError as exc:
            self._record(job, worker_id, instance, meta, Verdict(ResultStatus.FAILED, reason=str(exc)[:1000]), None)
            return
        prediction = outcome.prediction
        if not outcome.applicable or prediction is None:
            self._record(job, worker_id, instance, meta, Verdict(ResultStatus.NOT_APPLICABLE, reason=outcome.reason), None)
            return
        verdict = Verdict(
            ResultStatus.OK,
            probability=float(prediction.probability),
            label=prediction.label,
            threshold=float(prediction.threshold),
            cam=np.asarray(prediction.cam, dtype=float).round(5).tolist(),
            timings_ms={k: round(float(v), 3) for k, v in outcome.timings_ms.items()},
        )
        now = utcnow()
        try:
            report = build_ai_sr(source, self._ai_result(verdict, now))
        except ResultObjectError as exc:  # the source lacks what a valid report needs
            failed = Verdict(ResultStatus.FAILED, reason=f"report not built: {exc}"[:1000], probability=verdict.probability,
                             label=verdict.label, threshold=verdict.threshold, timings_ms=verdict.timings_ms)
            self._record(job, worker_id, instance, meta, failed, None)
            return
        self._record(job, worker_id, instance, meta, verdict, self._place(report), created_at=now)

    def _record(
        self,
        job: ClaimedJob,
        worker_id: str,
        instance: Instance,
        meta: InstanceMetadata,
        verdict: Verdict,
        sr: GeneratedObject | None,
        *,
        created_at: dt.datetime | None = None,
    ) -> None:
        """One transaction: SR instance, result row, deliveries, summary job, audit, job done."""
        manifest = self._engine.manifest
        summary = sr is not None and self._settings.inference.summary_image
        with self._db.session() as session:
            sr_instance = self._index_generated(session, sr) if sr is not None else None
            session.add(
                InferenceResult(
                    instance_pk=instance.id,
                    model_id=manifest.id,
                    model_version=manifest.version,
                    status=verdict.status,
                    reason=verdict.reason,
                    probability=verdict.probability,
                    label=verdict.label,
                    threshold=verdict.threshold,
                    timings_ms=verdict.timings_ms or {},
                    cam=verdict.cam,
                    sr_instance_pk=sr_instance.id if sr_instance is not None else None,
                    created_at=created_at or utcnow(),
                )
            )
            if sr_instance is not None:
                enqueue_deliveries(session, sr_instance, list(self._settings.dicom.destinations))
            if summary:
                jobs.enqueue(
                    session, SUMMARY_JOB, summary_job_key(instance.sop_instance_uid, manifest.id, manifest.version),
                    instance_pk=instance.id, payload={"model_id": manifest.id, "model_version": manifest.version},
                )
            append_audit(session, self._verdict_event(instance, meta, verdict, sr_instance))
            if not jobs.complete(session, job.id, worker_id):
                raise LeaseLostError()
        if sr_instance is not None and self._settings.dicom.destinations:
            self._on_reports_queued()
        if summary:
            self._on_summary_queued()
        log.info(
            "inference.result",
            status=str(verdict.status),
            probability=None if verdict.probability is None else round(verdict.probability, 4),
            label=verdict.label,
        )

    # -- summary -------------------------------------------------------------------------------

    def _summary(self, job: ClaimedJob, worker_id: str) -> None:
        instance = self._instance(job)
        result = self._result(instance.id)
        if result is None or result.status != ResultStatus.OK or result.cam is None:
            raise PermanentJobError("no classifier result with an activation map to draw")
        if result.sc_instance_pk is not None:
            self._complete_only(job, worker_id)
            return
        source = pydicom.dcmread(self._store.absolute(instance.path))
        meta = extract_metadata(source)
        verdict = Verdict(ResultStatus.OK, probability=result.probability, label=result.label,
                          threshold=result.threshold, cam=result.cam)
        try:
            display = display_image(source, self._engine.manifest.preprocessing, SUMMARY_MAX_SIDE)
            picture = build_summary_image(source, display, self._ai_result(verdict, result.created_at))
        except (PreprocessingError, ResultObjectError) as exc:
            raise PermanentJobError(f"summary image not built: {exc}") from exc
        generated = self._place(picture)
        with self._db.session() as session:
            sc_instance = self._index_generated(session, generated)
            row = session.get(InferenceResult, result.id)
            assert row is not None
            row.sc_instance_pk = sc_instance.id
            enqueue_deliveries(session, sc_instance, list(self._settings.dicom.destinations))
            append_audit(session, self._created_event(instance, meta, sc_instance, "summary image created"))
            if not jobs.complete(session, job.id, worker_id):
                raise LeaseLostError()
        if self._settings.dicom.destinations:
            self._on_reports_queued()

    # -- shared steps --------------------------------------------------------------------------

    def _instance(self, job: ClaimedJob) -> Instance:
        with self._db.read_session() as session:
            instance = session.get(Instance, job.instance_pk) if job.instance_pk is not None else None
        if instance is None:
            raise PermanentJobError(f"instance {job.instance_pk} is not in the index")
        return instance

    def _result(self, instance_pk: int) -> InferenceResult | None:
        manifest = self._engine.manifest
        with self._db.read_session() as session:
            return session.execute(
                select(InferenceResult).where(
                    InferenceResult.instance_pk == instance_pk,
                    InferenceResult.model_id == manifest.id,
                    InferenceResult.model_version == manifest.version,
                )
            ).scalar_one_or_none()

    def _complete_only(self, job: ClaimedJob, worker_id: str) -> None:
        with self._db.session() as session:
            if not jobs.complete(session, job.id, worker_id):
                raise LeaseLostError()

    def _ai_result(self, verdict: Verdict, when: dt.datetime) -> AiResult:
        """Map a verdict onto what the DICOM builders take (dicom_node must not see inference)."""
        manifest = self._engine.manifest
        assert verdict.probability is not None and verdict.threshold is not None
        return AiResult(
            probability=verdict.probability,
            threshold=verdict.threshold,
            model_id=manifest.id,
            model_name=manifest.name,
            model_version=manifest.version,
            manufacturer=manifest.manufacturer,
            device_uid=manifest.device_uid,
            intended_use=manifest.intended_use,
            cam=None if verdict.cam is None else np.asarray(verdict.cam, dtype=np.float32),
            completed_at=when,
        )

    def _place(self, dataset: Dataset) -> GeneratedObject:
        """Stage, fsync and rename a generated object into the store (before its transaction)."""
        relative = self._store.relative_path(dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
        data = encode(dataset)
        generated = GeneratedObject(dataset, self._store.stage_bytes(data), relative, len(data))
        self._store.commit(generated.staged, relative)
        return generated

    def _index_generated(self, session: Session, item: GeneratedObject) -> Instance:
        existing = find_instance(session, item.dataset.SOPInstanceUID)
        if existing is not None:  # a re-run rewrote the same deterministic object
            existing.sha256 = item.staged.sha256
            existing.size = item.size
            return existing
        return add_instance(
            session,
            extract_metadata(item.dataset),
            transfer_syntax_uid=str(item.dataset.file_meta.TransferSyntaxUID),
            relative_path=item.relative_path,
            size=item.size,
            sha256=item.staged.sha256,
            origin=InstanceOrigin.GENERATED,
            calling_ae=None,
        )

    def _verdict_event(
        self, instance: Instance, meta: InstanceMetadata, verdict: Verdict, sr: Instance | None
    ) -> AuditEvent:
        manifest = self._engine.manifest
        if verdict.status is ResultStatus.OK and sr is not None:
            description = (
                f"{manifest.id} {manifest.version}: {verdict.label} p={verdict.probability:.4f} "
                f"threshold={verdict.threshold:.4f}; SR created"
            )
            return self._created_event(instance, meta, sr, description)
        if verdict.status is ResultStatus.NOT_APPLICABLE:
            description, outcome = f"not applicable: {verdict.reason}", Outcome.SUCCESS
        else:
            description, outcome = f"inference failed: {verdict.reason}", Outcome.SERIOUS_FAILURE
        return self._event(instance, meta, Action.READ, outcome, description, None)

    def _created_event(self, instance: Instance, meta: InstanceMetadata, created: Instance, description: str) -> AuditEvent:
        return self._event(instance, meta, Action.CREATE, Outcome.SUCCESS, description, created)

    def _event(
        self,
        instance: Instance,
        meta: InstanceMetadata,
        action: Action,
        outcome: Outcome,
        description: str,
        created: Instance | None,
    ) -> AuditEvent:
        """PS3.15 A.5.3.4 DICOM Instances Accessed: the source read, the report (if any) created."""
        sop_classes = {instance.sop_class_uid: 1}
        instances = [instance.sop_instance_uid]
        if created is not None:
            sop_classes[created.sop_class_uid] = sop_classes.get(created.sop_class_uid, 0) + 1
            instances.append(created.sop_instance_uid)
        return ai_processing(
            self._audit_source,
            application_id=self._application_id,
            action=action,
            outcome=outcome,
            study_uid=meta.study_instance_uid,
            sop_classes=sop_classes,
            instances=instances,
            patient_id=meta.patient_id,
            patient_name=meta.patient_name,
            description=description[:1000],
            when=utcnow(),
            accession=meta.accession_number,
        )
