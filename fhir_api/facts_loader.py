"""Reading the facts of one study from the index and result tables (the projection's input).

Everything the FHIR resources of a study say is read here, in one transaction, and handed to
the pure mappers (:mod:`fhir_api.resources`) as :mod:`fhir_api.facts`.

Which DiagnosticReport status a study gets (FHIR R4 diagnostic-report-status):

* a study result exists: ``final`` (version 1), ``amended`` (later versions), ``cancelled``
  (nothing could be analysed; the reasons are in the conclusion). The report lists the image
  results that existed when that version was made; images analysed later appear as
  Observations at once but join the report only with the next (amended) version.
* no study result yet, some image analysed: ``preliminary`` — the study is still open (it has
  not been quiet for ``results.study_stable_seconds``); the provisional answer is the same rule
  applied to the images analysed so far (:func:`storage.study_results.aggregate`).
* no study result yet, nothing analysed: ``registered`` — images received, not yet looked at.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from conf.errors import NotFoundError
from fhir_api.facts import (
    ImageFinding,
    InstanceFacts,
    ModelFacts,
    OrderFacts,
    PatientFacts,
    ReportFacts,
    ReportStatus,
    SeriesFacts,
    StudyFacts,
)
from storage.models import (
    ImagingOrder,
    InferenceResult,
    Instance,
    InstanceOrigin,
    Patient,
    RegisteredModel,
    ResultStatus,
    Series,
    Study,
    StudyResult,
    StudyStatus,
)
from storage.study_results import ImageOutcome, aggregate, current_result, image_outcomes

_STATUS_OF_RESULT = {
    StudyStatus.FINAL: ReportStatus.FINAL,
    StudyStatus.AMENDED: ReportStatus.AMENDED,
    StudyStatus.NOT_ANALYSED: ReportStatus.CANCELLED,
}


@dataclass(frozen=True)
class StudyView:
    """All facts of one study: the report, the findings it may cite, the models behind them."""

    study: StudyFacts
    report: ReportFacts | None  # None when the study has no received image (nothing to report on)
    findings: tuple[ImageFinding, ...]  # every analysed image (the report cites those of its version)
    models: tuple[ModelFacts, ...]


def _patient_facts(patient: Patient) -> PatientFacts:
    return PatientFacts(
        patient_id=patient.patient_id, issuer=patient.issuer or "", name=patient.name,
        birth_date=patient.birth_date, sex=patient.sex,
    )


def _study_facts(session: Session, study: Study, patient: Patient) -> StudyFacts:
    series_rows = session.execute(
        select(Series).where(Series.study_pk == study.id).order_by(Series.series_number, Series.id)
    ).scalars().all()
    instances_by_series: dict[int, list[InstanceFacts]] = {}
    for instance in session.execute(
        select(Instance)
        .where(Instance.series_pk.in_([s.id for s in series_rows]))
        .order_by(Instance.instance_number, Instance.id)
    ).scalars():
        instances_by_series.setdefault(instance.series_pk, []).append(
            InstanceFacts(instance.sop_instance_uid, instance.sop_class_uid, instance.instance_number)
        )
    series = tuple(
        SeriesFacts(
            series_instance_uid=s.series_instance_uid, modality=s.modality, number=s.series_number,
            body_part=s.body_part_examined, description=s.description,
            instances=tuple(instances_by_series.get(s.id, ())),
        )
        for s in series_rows
        if instances_by_series.get(s.id)
    )
    orders: tuple[OrderFacts, ...] = ()
    if study.accession_number:
        orders = tuple(
            OrderFacts(
                placer_order_number=o.placer_order_number, placer_namespace=o.placer_namespace, status=o.status,
                authored=o.received_at, filler_order_number=o.filler_order_number, accession_number=o.accession_number,
                procedure_code=o.procedure_code, procedure_system=o.procedure_system, procedure_text=o.procedure_text,
                ordering_provider=o.ordering_provider, priority=o.priority,
            )
            for o in session.execute(
                select(ImagingOrder).where(ImagingOrder.accession_number == study.accession_number).order_by(ImagingOrder.id)
            ).scalars()
        )
    return StudyFacts(
        study_instance_uid=study.study_instance_uid, patient=_patient_facts(patient), orders=orders,
        accession_number=study.accession_number, study_id=study.study_id, study_date=study.study_date,
        study_time=study.study_time, description=study.description, referring_physician=study.referring_physician,
        series=series,
    )


def _model_facts(row: RegisteredModel) -> ModelFacts:
    return ModelFacts(
        model_id=row.model_id, name=row.name, version=row.version, manufacturer=row.manufacturer,
        device_uid=row.device_uid, intended_use=row.intended_use, threshold=row.threshold,
    )


def _findings(session: Session, study_pk: int) -> list[ImageFinding]:
    """Every ``ok`` image result of the study, oldest first (``analysed_at`` is the result's creation).

    Only results of each image's current revision count: an image re-stored with other content
    (``on_conflict = "replace"``) is judged again, and its earlier results are history."""
    rows = session.execute(_FINDINGS, {"study_pk": study_pk}).all()
    models = {
        (m.model_id, m.version): _model_facts(m)
        for m in session.execute(
            select(RegisteredModel).where(RegisteredModel.model_id.in_({r.model_id for r in rows}))
        ).scalars()
    }
    findings: list[ImageFinding] = []
    for row in rows:
        model = models.get((row.model_id, row.model_version))
        if model is None or row.probability is None or row.threshold is None:
            continue  # a result of a model never registered: nothing we could say about its device
        findings.append(
            ImageFinding(
                source_sop_instance_uid=row.source_uid, source_series_instance_uid=row.series_uid,
                probability=float(row.probability), label=row.label or "", threshold=float(row.threshold),
                model=model, analysed_at=row.created_at, sr_sop_instance_uid=row.sr_uid,
            )
        )
    return findings


def _findings_statement() -> Select[Any]:
    """The query of :func:`_findings`, built once: only the columns a finding needs (not the
    result rows' class activation maps and timings, which are JSON to decode)."""
    source = Instance.__table__.alias("source")
    source_series = Series.__table__.alias("source_series")
    report = Instance.__table__.alias("report")
    return (
        select(
            InferenceResult.model_id, InferenceResult.model_version, InferenceResult.probability,
            InferenceResult.threshold, InferenceResult.label, InferenceResult.created_at,
            source.c.sop_instance_uid.label("source_uid"), source_series.c.series_instance_uid.label("series_uid"),
            report.c.sop_instance_uid.label("sr_uid"),
        )
        .join(source, InferenceResult.instance_pk == source.c.id)
        .join(source_series, source.c.series_pk == source_series.c.id)
        .outerjoin(report, InferenceResult.sr_instance_pk == report.c.id)
        .where(
            source_series.c.study_pk == bindparam("study_pk"),
            source.c.origin == InstanceOrigin.RECEIVED,
            InferenceResult.source_revision == source.c.revision,
            InferenceResult.status == ResultStatus.OK,
            InferenceResult.probability.is_not(None),
        )
        .order_by(InferenceResult.id)
    )


_FINDINGS = _findings_statement()


def load_study_view(session: Session, study_pk: int) -> StudyView:
    """The facts of study *study_pk* as they stand in this transaction."""
    study = session.get(Study, study_pk)
    if study is None:
        raise NotFoundError(f"study {study_pk} is not in the index")
    patient = session.get(Patient, study.patient_pk)
    if patient is None:
        raise NotFoundError(f"the patient of study {study_pk} is not in the index")
    study_facts = _study_facts(session, study, patient)
    findings = _findings(session, study_pk)
    models = tuple({f.model.device_uid: f.model for f in findings}.values())
    outcomes = image_outcomes(session, study_pk)
    if not outcomes:
        return StudyView(study_facts, None, tuple(findings), models)
    latest = current_result(session, study_pk)
    if latest is not None:
        report = _reported(study_facts, latest, findings)
    else:
        report = _provisional(study_facts, outcomes, findings, study.updated_at)
    return StudyView(study_facts, report, tuple(findings), models)


def _model_of(findings: list[ImageFinding], model_id: str | None, version: str | None) -> ModelFacts | None:
    return next((f.model for f in findings if f.model.model_id == model_id and f.model.version == version), None)


def _reported(study: StudyFacts, latest: StudyResult, findings: list[ImageFinding]) -> ReportFacts:
    """The report of the newest study result version, citing the image results it was made from."""
    cited = [f for f in findings if f.analysed_at <= latest.created_at]
    return ReportFacts(
        study=study, status=_STATUS_OF_RESULT.get(StudyStatus(latest.status), ReportStatus.FINAL),
        issued=latest.created_at, images=latest.images, analysed=latest.analysed, label=latest.label,
        probability=latest.probability, threshold=latest.threshold,
        model=_model_of(cited, latest.model_id, latest.model_version),
        findings=tuple(cited), reasons=tuple(latest.reasons or ()), result_version=latest.version,
        sr_sop_instance_uids=tuple(f.sr_sop_instance_uid for f in cited if f.sr_sop_instance_uid),
    )


def _provisional(
    study: StudyFacts, outcomes: list[ImageOutcome], findings: list[ImageFinding], study_updated: dt.datetime
) -> ReportFacts:
    """The report of a study still open: the study-result rule over the images analysed so far."""
    provisional = aggregate([o for o in outcomes if not o.waiting], amends=False)
    if not findings or provisional.analysed == 0:
        return ReportFacts(
            study=study, status=ReportStatus.REGISTERED, issued=study_updated, images=len(outcomes),
            reasons=tuple(provisional.reasons),
        )
    return ReportFacts(
        study=study, status=ReportStatus.PRELIMINARY, issued=max(f.analysed_at for f in findings),
        images=len(outcomes), analysed=provisional.analysed, label=provisional.label,
        probability=provisional.probability, threshold=provisional.threshold,
        model=_model_of(findings, provisional.model_id, provisional.model_version),
        findings=tuple(findings), reasons=tuple(provisional.reasons), result_version=0,
        sr_sop_instance_uids=tuple(f.sr_sop_instance_uid for f in findings if f.sr_sop_instance_uid),
    )
