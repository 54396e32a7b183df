"""The shapes that results take between the parts, and the ports the result jobs are built from.

Parts never import each other (docs/architecture.md), so the job that turns a stored image into
a result (:mod:`storage.image_results`) is assembled by the composition root from ports defined
here: an :class:`Analyser` (the classifier, from ``inference``) and a :class:`ReportBuilder` (the
DICOM SR and summary image, from ``dicom_node``). What flows between them is plain data:
:class:`ModelIdentity` and :class:`ImageVerdict`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.db import Database
from storage.index import insert_ignore
from storage.metadata import InstanceMetadata
from storage.models import Instance, Patient, RegisteredModel, ResultStatus, Series, Study, utcnow

DisplayImage = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelIdentity:
    """What every report says about the algorithm (SR TID 4019, Contributing Equipment, the FHIR
    Device): enough to name the model version that produced a result, long after it was replaced."""

    model_id: str
    name: str
    version: str
    manufacturer: str
    device_uid: str
    intended_use: str
    threshold: float


@dataclass(frozen=True)
class ImageVerdict:
    """What one run of the classifier concluded about one image, as stored in its result row."""

    status: ResultStatus
    reason: str | None = None
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    cam: list[list[float]] | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: PHI-free intensity statistics of the model input (``inference.input_stats``), for drift monitoring.
    input_stats: dict[str, float] | None = None

    @property
    def positive(self) -> bool:
        return self.status is ResultStatus.OK and self.label is not None and self.label != "NORMAL"


@dataclass(frozen=True)
class Analysis:
    """An :class:`ImageVerdict` and, when asked for, the display image from the same decode."""

    verdict: ImageVerdict
    display: DisplayImage | None = None


class Analyser(Protocol):
    """The classifier as the result job sees it (implemented in ``inference``)."""

    @property
    def model(self) -> ModelIdentity: ...

    def analyse(self, source: Dataset, *, with_display: bool) -> Analysis:
        """Judge *source*. Not applicable and undecodable images are verdicts, not errors."""
        ...

    def display(self, source: Dataset) -> DisplayImage:
        """The display image alone (for a summary redrawn after a crash)."""
        ...


class ReportBuilder(Protocol):
    """The DICOM result objects (implemented in ``dicom_node``); pure functions of their inputs.

    Raise an :class:`~conf.errors.InvalidInputError` when the source lacks what a valid object
    needs. *instance_number* is the object's Instance Number within its series."""

    def structured_report(
        self, source: Dataset, verdict: ImageVerdict, model: ModelIdentity, completed_at: dt.datetime, instance_number: int
    ) -> Dataset: ...

    def summary_image(
        self,
        source: Dataset,
        display: DisplayImage,
        verdict: ImageVerdict,
        model: ModelIdentity,
        completed_at: dt.datetime,
        instance_number: int,
    ) -> Dataset: ...


def register_model(database: Database, model: ModelIdentity) -> None:
    """Record *model* once (idempotent): reports made by it can always name it later."""
    with database.session() as session:
        insert_ignore(
            session,
            RegisteredModel,
            {
                "model_id": model.model_id,
                "version": model.version,
                "name": model.name,
                "manufacturer": model.manufacturer,
                "device_uid": model.device_uid,
                "intended_use": model.intended_use,
                "threshold": model.threshold,
                "registered_at": utcnow(),
            },
            ["model_id", "version"],
        )


@dataclass(frozen=True)
class InstanceContext:
    """A stored instance with its patient/study/series fields, read from the index (no file I/O)."""

    instance_pk: int
    study_pk: int
    path: str
    origin: str
    meta: InstanceMetadata
    revision: int = 0  # Instance.revision: how often its content was replaced


def load_instance_context(session: Session, instance_pk: int) -> InstanceContext | None:
    """The index's view of one instance: what jobs need for audit records and decisions."""
    row = session.execute(
        select(Instance, Series, Study, Patient)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
        .where(Instance.id == instance_pk)
    ).one_or_none()
    if row is None:
        return None
    instance, series, study, patient = row
    meta = InstanceMetadata(
        patient_id=patient.patient_id,
        issuer_of_patient_id=patient.issuer,
        patient_name=patient.name,
        patient_birth_date=patient.birth_date,
        patient_sex=patient.sex,
        study_instance_uid=study.study_instance_uid,
        study_date=study.study_date,
        study_time=study.study_time,
        accession_number=study.accession_number,
        study_id=study.study_id,
        study_description=study.description,
        referring_physician=study.referring_physician,
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        series_number=series.series_number,
        body_part_examined=series.body_part_examined,
        series_description=series.description,
        sop_class_uid=instance.sop_class_uid,
        sop_instance_uid=instance.sop_instance_uid,
        instance_number=instance.instance_number,
    )
    return InstanceContext(instance.id, study.id, instance.path, instance.origin, meta, instance.revision or 0)


def verdict_record(verdict: ImageVerdict) -> dict[str, Any]:
    """The columns of an inference_result row that a verdict fills."""
    return {
        "status": verdict.status,
        "reason": verdict.reason,
        "probability": verdict.probability,
        "label": verdict.label,
        "threshold": verdict.threshold,
        "timings_ms": verdict.timings_ms,
        "cam": verdict.cam,
        "input_stats": verdict.input_stats,
    }
