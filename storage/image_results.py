"""The ``infer`` job: one stored image -> its result, its reports, their deliveries.

Assembled by the composition root from ports (:mod:`storage.results`): the classifier
(:class:`~storage.results.Analyser`, from ``inference``) and the DICOM result objects
(:class:`~storage.results.ReportBuilder`, from ``dicom_node``); where the reports go is the
:class:`~storage.outbox.Fanout`. The handler itself only orders the steps and keeps the
promises:

1. Metadata comes from the index; the source file is parsed once and its pixels decoded once
   (the classifier returns the display image for the summary from the same decode).
2. **SR first.** One transaction: the SR (placed in the store before it), the result row, the
   SR's deliveries, the study result trigger and the audit record. The delivery worker is woken
   as soon as it commits — the radiologist's report never waits for the picture.
3. Then the summary image (when enabled and there is a positive or negative finding): placed,
   indexed, delivered, audited, and the job completed, in a second transaction. A crash between
   the two re-runs the job, which finds the result recorded and draws only the picture.

Generated UIDs derive from (source SOP Instance UID, model id, model version), so a re-run
rewrites the same objects and never makes a second report. A source replaced with other content
(``dicom.on_conflict = "replace"``: a new :attr:`~storage.models.Instance.revision`) is judged
again by the same model version: its result names the revision, and its SR and summary image
get SOP Instance UIDs derived from the builders' ones and the revision (:func:`revised_uid`) —
new objects, delivered anew, never a second meaning under a UID already sent. Instance Numbers are the source's
rank among the study's received images, distinct within the SR and summary series and the same
on every re-run.
"""

from __future__ import annotations

import datetime as dt
import struct
import time
from dataclasses import dataclass, replace

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from sqlalchemy import func, select

from audit.builders import ai_processing
from audit.events import Action, AuditEvent, AuditSource, Outcome
from audit.store import append as append_audit
from conf.errors import InvalidInputError, LeaseLostError, NotFoundError, UnavailableError
from storage import jobs
from storage.db import Database
from storage.filestore import FileStore
from storage.generated import GeneratedObject, index_generated, place_generated
from storage.jobs import ClaimedJob
from storage.models import InferenceResult, Instance, InstanceOrigin, ResultStatus, Series, utcnow
from storage.outbox import DeliveryPriority, Fanout
from storage.results import (
    Analyser,
    DisplayImage,
    ImageVerdict,
    InstanceContext,
    ModelIdentity,
    ReportBuilder,
    load_instance_context,
    register_model,
    verdict_record,
)
from storage.runtime import Waker
from storage.study_results import schedule_study_changed, schedule_study_result
from storage.tracing import NOOP_SPAN, NOOP_TRACER, AttributeValue, Span, Tracer, traceparent_of
from storage.uids import derive_uid

log = structlog.get_logger(__name__)


def revised_uid(uid: str, revision: int) -> str:
    """The SOP Instance UID of a result object about revision *revision* of its source: the
    builder's own (derived from source, model id and version) for the content first stored,
    a UID derived from it and the revision for a replacement (deterministic: a re-run of the
    same revision rewrites the same object)."""
    return uid if revision == 0 else derive_uid(uid, "source-revision", str(revision))


def _for_revision(dataset: Dataset, revision: int) -> Dataset:
    """*dataset* (a freshly built SR / summary image) under its :func:`revised_uid`."""
    if revision:
        uid = UID(revised_uid(str(dataset.SOPInstanceUID), revision))
        dataset.SOPInstanceUID = uid
        dataset.file_meta.MediaStorageSOPInstanceUID = uid
    return dataset


@dataclass(frozen=True)
class ImageResultOptions:
    summary_image: bool = True
    study_stable_seconds: float = 10.0
    application_id: str = "PNEUMO/inference"


@dataclass
class _Work:
    """What one run of the job knows so far (filled in step by step)."""

    context: InstanceContext
    model: ModelIdentity
    source: Dataset | None = None
    display: DisplayImage | None = None
    read_ms: float = 0.0
    instance_number: int | None = None
    #: The ``inference.analyse`` span: its ``traceparent`` goes with the deliveries queued.
    span: Span = NOOP_SPAN
    #: ``time.time_ns()`` when reading the source began (the stage spans are laid out from it).
    started_ns: int = 0


class ImageResultHandler:
    """Handler for ``infer`` jobs (see the module docstring for the steps and guarantees)."""

    def __init__(
        self,
        database: Database,
        store: FileStore,
        analyser: Analyser,
        reports: ReportBuilder,
        fanout: Fanout,
        audit_source: AuditSource,
        options: ImageResultOptions,
        *,
        on_deliveries_queued: Waker | None = None,
        tracer: Tracer = NOOP_TRACER,
    ) -> None:
        """*tracer*: an ``inference.analyse`` span per job, a child of the ``dicom.c-store``
        span that queued it (:mod:`storage.tracing`)."""
        self._db = database
        self._store = store
        self._tracer = tracer
        self._analyser = analyser
        self._reports = reports
        self._fanout = fanout
        self._audit_source = audit_source
        self._options = options
        self._on_deliveries_queued = on_deliveries_queued or (lambda: None)
        register_model(database, analyser.model)

    def warm_up(self, source: Dataset) -> None:
        """Judge *source* and build its SR and summary image in memory, storing nothing.

        A worker process's first image otherwise paid ~0.5 s of first-use costs (lazy imports of
        the DICOM builders, font loading, NumPy and ONNX Runtime first calls) on the C-STORE →
        report path; with two worker processes both first images were slow.
        """
        analysis = self._analyser.analyse(source, with_display=self._options.summary_image)
        verdict = analysis.verdict
        if verdict.status is not ResultStatus.OK:
            return
        now = utcnow()
        model = self._analyser.model
        self._reports.structured_report(source, verdict, model, now, 1)
        if analysis.display is not None:
            self._reports.summary_image(source, analysis.display, verdict, model, now, 1)

    def __call__(self, job: ClaimedJob, worker_id: str) -> None:
        model = self._analyser.model
        attributes: dict[str, AttributeValue] | None = {
            "job.id": job.id, "job.attempt": job.attempts, "model.id": model.model_id, "model.version": model.version,
        } if self._tracer.enabled else None
        with self._tracer.span("inference.analyse", parent=traceparent_of(job.payload), attributes=attributes) as span:
            self._run(job, worker_id, _Work(self._context(job), model, span=span))

    def _run(self, job: ClaimedJob, worker_id: str, work: _Work) -> None:
        result = self._existing_result(work)
        work.span.set_attribute("inference.rerun", result is not None)
        if result is None:
            result = self._analyse_and_report(job, worker_id, work)
            if not self._wants_summary(result):
                return  # completed with the result
        if self._wants_summary(result):
            self._summarise(job, worker_id, work, result)
        else:
            self._complete(job, worker_id)

    # -- steps ---------------------------------------------------------------------------------

    def _context(self, job: ClaimedJob) -> InstanceContext:
        with self._db.read_session() as session:
            context = load_instance_context(session, job.instance_pk) if job.instance_pk is not None else None
        if context is None:
            raise NotFoundError(f"instance {job.instance_pk} is not in the index")
        return context

    def _existing_result(self, work: _Work) -> InferenceResult | None:
        with self._db.read_session() as session:
            return session.execute(
                select(InferenceResult).where(
                    InferenceResult.instance_pk == work.context.instance_pk,
                    InferenceResult.model_id == work.model.model_id,
                    InferenceResult.model_version == work.model.version,
                    InferenceResult.source_revision == work.context.revision,
                )
            ).scalar_one_or_none()

    def _read_source(self, work: _Work) -> Dataset | ImageVerdict:
        """The one full parse of the source; an unreadable file is a verdict, not an error."""
        work.started_ns = time.time_ns()
        started = time.perf_counter()
        try:
            # The store authenticates and decrypts; a file that fails raises
            # StoredFileIntegrityError (not retryable: the job is dead-lettered, no result made).
            with self._store.open(work.context.path) as handle:
                source = pydicom.dcmread(handle)
        except FileNotFoundError as exc:
            raise NotFoundError("the stored file of the instance is missing") from exc
        except OSError as exc:
            raise UnavailableError(f"cannot read the stored file: {exc.strerror}") from exc
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, struct.error) as exc:
            return ImageVerdict(ResultStatus.FAILED, reason=f"unreadable DICOM data set: {exc.__class__.__name__}")
        work.read_ms = (time.perf_counter() - started) * 1e3
        work.source = source
        return source

    def _analyse_and_report(self, job: ClaimedJob, worker_id: str, work: _Work) -> InferenceResult:
        source = self._read_source(work)
        if isinstance(source, ImageVerdict):
            verdict = source
        else:
            analysis = self._analyser.analyse(source, with_display=self._options.summary_image)
            verdict, work.display = analysis.verdict, analysis.display
            if verdict.timings_ms:
                verdict = replace(verdict, timings_ms={"read": round(work.read_ms, 3), **verdict.timings_ms})
                self._stage_spans(work, verdict.timings_ms)
        now = utcnow()
        report: GeneratedObject | None = None
        if verdict.status is ResultStatus.OK and work.source is not None:
            try:
                dataset = self._reports.structured_report(
                    work.source, verdict, work.model, now, self._instance_number(work)
                )
            except InvalidInputError as exc:  # the source lacks what a valid report needs
                verdict = replace(verdict, status=ResultStatus.FAILED, reason=f"report not built: {exc}"[:1000], cam=None)
            else:
                report = place_generated(self._store, _for_revision(dataset, work.context.revision))
        return self._record(job, worker_id, work, verdict, report, now)

    @staticmethod
    def _stage_spans(work: _Work, timings_ms: dict[str, float]) -> None:
        """Child spans ``read``, ``decode``, ``preprocess``, ``infer`` from the measured durations,
        laid end to end from when reading began (the durations are exact, the starts approximate)."""
        at = work.started_ns
        for stage in ("read", "decode", "preprocess", "infer"):
            if stage in timings_ms:
                end = at + int(timings_ms[stage] * 1e6)
                work.span.add_stage(f"inference.{stage}", at, end)
                at = end

    def _record(
        self, job: ClaimedJob, worker_id: str, work: _Work, verdict: ImageVerdict,
        report: GeneratedObject | None, now: dt.datetime,
    ) -> InferenceResult:
        """Transaction 1: SR, result row, deliveries, study trigger, audit — and the job's
        completion too, unless a summary image follows in transaction 2."""
        context = work.context
        finished = not (self._options.summary_image and report is not None)
        queued = 0
        with self._db.session() as session:
            if not (jobs.complete(session, job.id, worker_id) if finished else jobs.holds(session, job.id, worker_id)):
                raise LeaseLostError()
            sr_instance = index_generated(session, report) if report is not None else None
            result = InferenceResult(
                instance_pk=context.instance_pk,
                model_id=work.model.model_id,
                model_version=work.model.version,
                source_revision=context.revision,
                sr_instance_pk=sr_instance.id if sr_instance is not None else None,
                created_at=now,
                **verdict_record(verdict),
            )
            session.add(result)
            if sr_instance is not None:
                queued = self._fanout.generated_instance(session, sr_instance, traceparent=work.span.traceparent)
            schedule_study_result(session, context.study_pk, context.meta.study_instance_uid,
                                  self._options.study_stable_seconds)
            append_audit(session, self._verdict_event(work, verdict, sr_instance))
            session.flush()
            session.expunge(result)
        if queued:
            self._on_deliveries_queued()
        work.span.set_attribute("inference.status", str(verdict.status))
        work.span.set_attribute("deliveries.queued", queued)
        log.info(
            "inference.result",
            status=str(verdict.status),
            probability=None if verdict.probability is None else round(verdict.probability, 4),
            label=verdict.label,
            reason=verdict.reason,  # why not analysed: rule texts, never values read from the image
        )
        return result

    def _wants_summary(self, result: InferenceResult) -> bool:
        return (
            self._options.summary_image
            and result.status == ResultStatus.OK
            and result.sr_instance_pk is not None
            and result.sc_instance_pk is None
        )

    def _summarise(self, job: ClaimedJob, worker_id: str, work: _Work, result: InferenceResult) -> None:
        """Transaction 2: the summary image, its deliveries and audit record; the job completes."""
        source = work.source if work.source is not None else self._read_source(work)
        if isinstance(source, ImageVerdict):
            raise InvalidInputError(f"summary image not built: {source.reason}")
        display = work.display if work.display is not None else self._analyser.display(source)
        verdict = ImageVerdict(
            ResultStatus.OK, probability=result.probability, label=result.label, threshold=result.threshold, cam=result.cam
        )
        try:
            dataset = self._reports.summary_image(
                source, display, verdict, work.model, result.created_at, self._instance_number(work)
            )
        except InvalidInputError as exc:
            raise InvalidInputError(f"summary image not built: {exc}") from exc
        picture = place_generated(self._store, _for_revision(dataset, work.context.revision))
        queued = 0
        with self._db.session() as session:
            sc_instance = index_generated(session, picture)
            row = session.get(InferenceResult, result.id)
            if row is None:
                raise NotFoundError("the result to draw disappeared")
            row.sc_instance_pk = sc_instance.id
            queued = self._fanout.generated_instance(
                session, sc_instance, DeliveryPriority.PICTURE, traceparent=work.span.traceparent
            )
            # The study gained a series: what is published about it (ImagingStudy) is out of date.
            schedule_study_changed(session, work.context.study_pk, work.context.meta.study_instance_uid)
            append_audit(session, self._event(work, Action.CREATE, Outcome.SUCCESS, "summary image created", sc_instance))
            if not jobs.complete(session, job.id, worker_id):
                raise LeaseLostError()
        if queued:
            self._on_deliveries_queued()

    def _complete(self, job: ClaimedJob, worker_id: str) -> None:
        with self._db.session() as session:
            if not jobs.complete(session, job.id, worker_id):
                raise LeaseLostError()

    def _instance_number(self, work: _Work) -> int:
        """The source's rank among its study's received images: distinct per study, stable."""
        if work.instance_number is None:
            context = work.context
            with self._db.read_session() as session:
                rank = session.execute(
                    select(func.count(Instance.id))
                    .join(Series, Instance.series_pk == Series.id)
                    .where(
                        Series.study_pk == context.study_pk,
                        Instance.origin == InstanceOrigin.RECEIVED,
                        Instance.id <= context.instance_pk,
                    )
                ).scalar_one()
            work.instance_number = max(1, int(rank))
        return work.instance_number

    # -- audit ---------------------------------------------------------------------------------

    def _verdict_event(self, work: _Work, verdict: ImageVerdict, sr: Instance | None) -> AuditEvent:
        model = work.model
        if verdict.status is ResultStatus.OK and sr is not None:
            description = (
                f"{model.model_id} {model.version}: {verdict.label} p={verdict.probability:.4f} "
                f"threshold={verdict.threshold:.4f}; SR created"
            )
            return self._event(work, Action.CREATE, Outcome.SUCCESS, description, sr)
        if verdict.status is ResultStatus.NOT_APPLICABLE:
            return self._event(work, Action.READ, Outcome.SUCCESS, f"not applicable: {verdict.reason}", None)
        return self._event(work, Action.READ, Outcome.SERIOUS_FAILURE, f"inference failed: {verdict.reason}", None)

    def _event(self, work: _Work, action: Action, outcome: Outcome, description: str, created: Instance | None) -> AuditEvent:
        """PS3.15 A.5.3.4 DICOM Instances Accessed: the source read, the report (if any) created."""
        meta = work.context.meta
        sop_classes = {meta.sop_class_uid: 1}
        instances = [meta.sop_instance_uid]
        if created is not None:
            sop_classes[created.sop_class_uid] = sop_classes.get(created.sop_class_uid, 0) + 1
            instances.append(created.sop_instance_uid)
        return ai_processing(
            self._audit_source,
            application_id=self._options.application_id,
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
