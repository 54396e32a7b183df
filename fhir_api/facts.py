"""What the FHIR resources are made from: plain data read from the index and result tables.

The projection (:mod:`fhir_api.projection`) reads these from the database; the mappers
(:mod:`fhir_api.resources`) turn them into FHIR R4 resources without touching the database, so
that every mapping is a pure function, tested with tables of cases. Strings are as DICOM holds
them (PN with ``^``, DA ``YYYYMMDD``, TM ``HHMMSS.FFFFFF``); the mappers convert.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PatientFacts:
    """The DICOM Patient Module (PS3.3 C.7.1.1) of one patient."""

    patient_id: str
    issuer: str = ""  # Issuer of Patient ID (0010,0021); "" when unknown
    name: str | None = None  # DICOM PN, e.g. "Doe^Jane"
    birth_date: str | None = None  # DA
    sex: str | None = None  # M / F / O


@dataclass(frozen=True)
class InstanceFacts:
    sop_instance_uid: str
    sop_class_uid: str
    number: int | None = None


@dataclass(frozen=True)
class SeriesFacts:
    series_instance_uid: str
    modality: str | None = None
    number: int | None = None
    body_part: str | None = None  # Body Part Examined, e.g. CHEST
    description: str | None = None
    instances: tuple[InstanceFacts, ...] = ()


@dataclass(frozen=True)
class OrderFacts:
    """An imaging order received over HL7 (ORM^O01 / OMI^O23) for the study's accession: a ServiceRequest."""

    placer_order_number: str
    placer_namespace: str  # "" when the order had none; "accession" when it was keyed by accession
    status: str  # active / cancelled
    authored: dt.datetime  # when we received it
    filler_order_number: str | None = None
    accession_number: str | None = None
    procedure_code: str | None = None
    procedure_system: str | None = None  # HL7 coding system (LN, SCT, C4, L ...)
    procedure_text: str | None = None
    ordering_provider: str | None = None  # PN
    priority: str | None = None  # HL7 table 0027: S, A, R, P, C, T


@dataclass(frozen=True)
class StudyFacts:
    """The study as we hold it: every series, ours (SR, summary image) included."""

    study_instance_uid: str
    patient: PatientFacts
    accession_number: str | None = None
    study_id: str | None = None
    study_date: str | None = None  # DA
    study_time: str | None = None  # TM
    description: str | None = None
    referring_physician: str | None = None  # PN
    series: tuple[SeriesFacts, ...] = ()
    orders: tuple[OrderFacts, ...] = ()  # matched by accession number


@dataclass(frozen=True)
class ModelFacts:
    """The classifier version (the FHIR Device; the SR's algorithm identification, TID 4019)."""

    model_id: str
    name: str
    version: str
    manufacturer: str
    device_uid: str
    intended_use: str
    threshold: float


@dataclass(frozen=True)
class ImageFinding:
    """The classifier's verdict on one analysed image (status ``ok``): one Observation."""

    source_sop_instance_uid: str
    source_series_instance_uid: str
    probability: float  # 0..1
    label: str  # PNEUMONIA / NORMAL
    threshold: float
    model: ModelFacts
    analysed_at: dt.datetime
    sr_sop_instance_uid: str | None = None  # our TID 1500 SR of this image, when stored

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


class ReportStatus(enum.StrEnum):
    """The DiagnosticReport status (FHIR R4 value set diagnostic-report-status) of a study."""

    REGISTERED = "registered"  # images received, none analysed yet
    PRELIMINARY = "preliminary"  # some images analysed, the study is still open (no study result yet)
    FINAL = "final"  # the study result
    AMENDED = "amended"  # a later version of the study result (a late image)
    CANCELLED = "cancelled"  # nothing in the study could be analysed (the reasons say why)


@dataclass(frozen=True)
class ReportFacts:
    """One study's report as it stands now: one DiagnosticReport (versions are kept by the projection)."""

    study: StudyFacts
    status: ReportStatus
    issued: dt.datetime  # when this state was reached (the study result's creation, or the newest image result)
    images: int = 0
    analysed: int = 0
    label: str | None = None  # PNEUMONIA / NORMAL when analysed
    probability: float | None = None  # the deciding image's, 0..1
    threshold: float | None = None
    model: ModelFacts | None = None  # the deciding image's model
    findings: tuple[ImageFinding, ...] = ()
    reasons: tuple[dict[str, Any], ...] = ()  # [{"reason": str, "images": int}] for images not analysed
    result_version: int = 0  # the study result version (0 while preliminary/registered)
    sr_sop_instance_uids: tuple[str, ...] = field(default=())  # our SRs in the study
