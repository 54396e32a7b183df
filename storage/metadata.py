"""Pure mapping from a DICOM header to the fields we index (PS3.3 C.7 Patient/Study/Series,
C.12.1 SOP Common). Kept free of I/O so it can be tested with tables of datasets."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from storage.uids import validate_uid


class MetadataError(ValueError):
    """The dataset lacks what we need to file it (a UID missing or malformed)."""


@dataclass(frozen=True)
class InstanceMetadata:
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    study_instance_uid: str
    study_date: str | None
    study_time: str | None
    accession_number: str | None
    study_id: str | None
    study_description: str | None
    referring_physician: str | None
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    body_part_examined: str | None
    series_description: str | None
    sop_class_uid: str
    sop_instance_uid: str
    instance_number: int | None


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        raise MetadataError(f"{keyword} is missing")
    try:
        return validate_uid(str(value).strip().rstrip("\x00"), keyword)
    except ValueError as exc:
        raise MetadataError(str(exc)) from exc


def extract_metadata(ds: Dataset) -> InstanceMetadata:
    """Read the indexing fields from a header; raises :class:`MetadataError` on bad UIDs."""
    return InstanceMetadata(
        patient_id=_text(ds, "PatientID", 64) or "",
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64) or "",
        patient_name=_text(ds, "PatientName", 324),
        patient_birth_date=_text(ds, "PatientBirthDate", 8),
        patient_sex=_text(ds, "PatientSex", 16),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_id=_text(ds, "StudyID", 16),
        study_description=_text(ds, "StudyDescription", 64),
        referring_physician=_text(ds, "ReferringPhysicianName", 324),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        body_part_examined=_text(ds, "BodyPartExamined", 16),
        series_description=_text(ds, "SeriesDescription", 64),
        sop_class_uid=_uid(ds, "SOPClassUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        instance_number=_int(ds, "InstanceNumber"),
    )
