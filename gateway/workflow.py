"""The workflow of one received image (DESIGN.md §3 steps 3-5): the ``infer`` job handler.

stored instance -> applicability -> classifier -> result row -> SR (+ SC) stored as our own
instances -> one delivery job per configured destination -> audit -> job done, all committed
in one transaction. The SR/SC files are placed before that transaction; their UIDs derive from
(source SOP Instance UID, model id, model version), so a job that runs twice — because its
worker died after placing files but before committing — rewrites the same files under the same
UIDs and never creates a second report.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from dataclasses import dataclass

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
from dicom_node.sr import build_ai_sr
from dicom_node.summary_image import build_summary_image
from gateway.delivery import enqueue_deliveries
from gateway.worker import LeaseLostError
from inference.applicability import ApplicabilityRules
from inference.engine import InferenceEngine, Prediction
from inference.errors import PreprocessingError
from inference.pipeline import ClassificationOutcome, classify_dataset
from storage import jobs
from storage.db import Database
from storage.filestore import FileStore, StagedFile
from storage.index import add_instance, find_instance
from storage.jobs import ClaimedJob
from storage.metadata import InstanceMetadata, extract_metadata
from storage.models import InferenceResult, Instance, InstanceOrigin, ResultStatus, utcnow

log = structlog.get_logger(__name__)

#: Longest side of the image drawn in the summary Secondary Capture.
SUMMARY_MAX_SIDE = 1024


@dataclass(frozen=True)
class GeneratedObject:
    dataset: Dataset
    staged: StagedFile
    relative_path: str
    size: int


def to_ai_result(prediction: Prediction, engine: InferenceEngine, when: dt.datetime) -> AiResult:
    """Map the inference part's prediction onto what the DICOM builders take (pure)."""
    manifest = engine.manifest
    return AiResult(
        probability=prediction.probability,
        threshold=prediction.threshold,
        model_id=manifest.id,
        model_name=manifest.name,
        model_version=manifest.version,
        manufacturer=manifest.manufacturer,
        device_uid=manifest.device_uid,
        intended_use=manifest.intended_use,
        cam=prediction.cam,
        completed_at=when,
    )


def encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class InferenceWorkflow:
    """The ``infer`` job handler (see :data:`gateway.worker.JobHandler`)."""

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
    ) -> None:
        self._db = database
        self._store = store
        self._engine = engine
        self._settings = settings
        self._rules = rules
        self._audit_source = audit_source
        self._application_id = f"{settings.dicom.ae_title}/inference"
        self._on_reports_queued = on_reports_queued or (lambda: None)

    def __call__(self, job: ClaimedJob, worker_id: str) -> None:
        manifest = self._engine.manifest
        with self._db.read_session() as session:
            instance = session.get(Instance, job.instance_pk) if job.instance_pk is not None else None
            if instance is None:
                raise LookupError(f"job {job.id}: instance {job.instance_pk} not found")
            done = session.execute(
                select(InferenceResult.id).where(
                    InferenceResult.instance_pk == instance.id,
                    InferenceResult.model_id == manifest.id,
                    InferenceResult.model_version == manifest.version,
                )
            ).first()
        if done is not None:  # this model version already judged this instance
            with self._db.session() as session:
                if not jobs.complete(session, job.id, worker_id):
                    raise LeaseLostError()
            return

        source = pydicom.dcmread(self._store.absolute(instance.path))
        meta = extract_metadata(source)
        try:
            outcome = classify_dataset(
                source, self._engine, self._rules,
                display_max_side=SUMMARY_MAX_SIDE if self._settings.inference.summary_image else None,
            )
        except PreprocessingError as exc:
            self._record(job, worker_id, instance, meta, None, [], status=ResultStatus.FAILED, reason=str(exc)[:1000])
            return

        if not outcome.applicable or outcome.prediction is None:
            self._record(job, worker_id, instance, meta, outcome, [], status=ResultStatus.NOT_APPLICABLE, reason=outcome.reason)
            return

        now = utcnow()
        try:
            result = to_ai_result(outcome.prediction, self._engine, now)
            reports = [build_ai_sr(source, result)]
            if outcome.display is not None:
                reports.append(build_summary_image(source, outcome.display, result))
        except ResultObjectError as exc:  # the source lacks what a valid report needs: retrying cannot help
            self._record(job, worker_id, instance, meta, outcome, [], status=ResultStatus.FAILED,
                         reason=f"report not built: {exc}"[:1000])
            return
        generated = [self._stage(report) for report in reports]
        try:
            for item in generated:
                self._store.commit(item.staged, item.relative_path)
            self._record(job, worker_id, instance, meta, outcome, generated, status=ResultStatus.OK, reason=None)
        finally:
            for item in generated:
                self._store.discard(item.staged)

    def _stage(self, dataset: Dataset) -> GeneratedObject:
        relative = self._store.relative_path(dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
        data = encode(dataset)
        return GeneratedObject(dataset, self._store.stage_bytes(data), relative, len(data))

    def _record(
        self,
        job: ClaimedJob,
        worker_id: str,
        instance: Instance,
        meta: InstanceMetadata,
        outcome: ClassificationOutcome | None,
        generated: list[GeneratedObject],
        *,
        status: ResultStatus,
        reason: str | None,
    ) -> None:
        """One transaction: generated instances, result row, deliveries, audit, job done."""
        manifest = self._engine.manifest
        prediction = outcome.prediction if outcome is not None else None
        with self._db.session() as session:
            stored = [self._index_generated(session, item) for item in generated]
            row = InferenceResult(
                instance_pk=instance.id,
                model_id=manifest.id,
                model_version=manifest.version,
                status=status,
                reason=reason,
                probability=prediction.probability if prediction else None,
                label=prediction.label if prediction else None,
                threshold=prediction.threshold if prediction else None,
                timings_ms=dict(outcome.timings_ms) if outcome is not None else {},
                sr_instance_pk=stored[0].id if stored else None,
                sc_instance_pk=stored[1].id if len(stored) > 1 else None,
                created_at=utcnow(),
            )
            session.add(row)
            for generated_instance in stored:
                enqueue_deliveries(session, generated_instance, list(self._settings.dicom.destinations))
            append_audit(session, self._audit_event(instance, meta, status, reason, prediction, stored))
            if not jobs.complete(session, job.id, worker_id):
                raise LeaseLostError()
        if stored and self._settings.dicom.destinations:
            self._on_reports_queued()
        log.info(
            "inference.result",
            status=str(status),
            probability=None if prediction is None else round(prediction.probability, 4),
            label=None if prediction is None else prediction.label,
            reports=len(stored),
        )

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

    def _audit_event(
        self,
        instance: Instance,
        meta: InstanceMetadata,
        status: ResultStatus,
        reason: str | None,
        prediction: Prediction | None,
        stored: list[Instance],
    ) -> AuditEvent:
        manifest = self._engine.manifest
        if status is ResultStatus.OK and prediction is not None:
            description = (
                f"{manifest.id} {manifest.version}: {prediction.label} p={prediction.probability:.4f} "
                f"threshold={prediction.threshold:.4f}; created {len(stored)} object(s)"
            )
            action, outcome = Action.CREATE, Outcome.SUCCESS
        elif status is ResultStatus.NOT_APPLICABLE:
            description, action, outcome = f"not applicable: {reason}", Action.READ, Outcome.SUCCESS
        else:
            description, action, outcome = f"inference failed: {reason}", Action.READ, Outcome.SERIOUS_FAILURE
        sop_classes: dict[str, int] = {instance.sop_class_uid: 1}
        for generated in stored:
            sop_classes[generated.sop_class_uid] = sop_classes.get(generated.sop_class_uid, 0) + 1
        return ai_processing(
            self._audit_source,
            application_id=self._application_id,
            action=action,
            outcome=outcome,
            study_uid=meta.study_instance_uid,
            sop_classes=sop_classes,
            instances=[instance.sop_instance_uid, *(g.sop_instance_uid for g in stored)],
            patient_id=meta.patient_id,
            patient_name=meta.patient_name,
            description=description[:1000],
            when=utcnow(),
            accession=meta.accession_number,
        )
