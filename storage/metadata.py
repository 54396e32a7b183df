"""Pure mapping from a DICOM header to the fields we index (PS3.3 C.7 Patient/Study/Series,
C.12.1 SOP Common). Kept free of I/O so it can be tested with tables of datasets.

A header comes from the network and is attacker-controlled: a Patient's Birth Date written
``05/04/1923``, or a Study Time whose malformed length swallowed the next elements, is not a
value of its VR (PS3.5 §6.2). Such a value is indexed as absent, exactly as PS3.5 §7.4.3 lets a
Type 2 attribute be empty, rather than stored, matched in C-FIND or copied into a report where it
breaks the object or an error message. :func:`is_valid_value` is the one check, shared with the
SR and summary image builders (``dicom_node/sr.py``).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM, VALIDATORS, PersonName

from storage.uids import validate_uid

#: VRs whose values may not hold control characters other than ESC (PS3.5 §6.2, Table 6.2-1).
_NO_CONTROL_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"})
#: Text VRs that also allow the format effectors CR, LF, FF and TAB (LT, ST, UT).
_FORMATTED_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
_CONTROL_EXCEPT_FORMAT = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
_TEMPORAL: dict[str, tuple[type, Callable[[str], object]]] = {
    "DA": (datetime.date, DA),
    "DT": (datetime.datetime, DT),
    "TM": (datetime.time, TM),
}


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


def is_valid_value(vr: str, value: object) -> bool:
    """True when *value* is a conformant value of *vr* (PS3.5 §6.2), or empty.

    Checks what pydicom's validators check (length, character repertoire by regex, PN
    components), plus the control characters PS3.5 §6.2 excludes, plus — for DA, DT and TM —
    that the value is a real date/time (``19231340`` matches the DA pattern but is no date;
    highdicom's ``DA()`` raises on it). Multi-valued elements are valid when every value is.
    Never logs or warns, so a caller can test a value without it reaching a log line.
    """
    if value is None or value in ("", b""):
        return True
    if isinstance(value, (MultiValue, list, tuple)):
        return all(is_valid_value(vr, item) for item in value)
    if vr in _TEMPORAL:
        kind, parse = _TEMPORAL[vr]
        if isinstance(value, kind):
            return True
        if not isinstance(value, str) or _CONTROL.search(value):
            return False
        try:
            parse(value)
        except (ValueError, TypeError, OverflowError):
            return False
    elif isinstance(value, PersonName):
        value = str(value)
    elif vr in ("DS", "IS") and not isinstance(value, (str, bytes)):
        value = getattr(value, "original_string", None) or str(value)
    if isinstance(value, str):
        if vr in _NO_CONTROL_VRS and _CONTROL.search(value):
            return False
        if vr in _FORMATTED_TEXT_VRS and _CONTROL_EXCEPT_FORMAT.search(value):
            return False
    validator: Callable[[str, Any], tuple[bool, str]] | None = VALIDATORS.get(vr)
    if validator is None:
        return True
    valid, _message = validator(vr, value)
    return bool(valid)


def checked_value(ds: Dataset, keyword: str) -> object | None:
    """The value of *keyword* when present and valid for its VR, else None (see the module doc)."""
    if keyword not in ds:
        return None
    element = ds.data_element(keyword)
    if element is None or element.value in (None, "") or not is_valid_value(element.VR, element.value):
        return None
    value: object = element.value
    return value


def _valid_text(ds: Dataset, keyword: str, limit: int) -> str | None:
    """Like :func:`_text`, but an invalid value (wrong format, control characters) is absent."""
    value = checked_value(ds, keyword)
    if value is None:
        return None
    return str(value).strip()[:limit] or None


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
    """Read the indexing fields from a header; raises :class:`MetadataError` on bad UIDs.

    Patient ID and its issuer keep their (truncated) text even when not conformant: they key the
    patient record, and an empty key would file the study under another patient. Every other
    field is absent when its value is not valid for its VR (:func:`is_valid_value`).
    """
    return InstanceMetadata(
        patient_id=_text(ds, "PatientID", 64) or "",
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64) or "",
        patient_name=_valid_text(ds, "PatientName", 324),
        patient_birth_date=_valid_text(ds, "PatientBirthDate", 8),
        patient_sex=_valid_text(ds, "PatientSex", 16),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        study_date=_valid_text(ds, "StudyDate", 8),
        study_time=_valid_text(ds, "StudyTime", 16),
        accession_number=_valid_text(ds, "AccessionNumber", 16),
        study_id=_valid_text(ds, "StudyID", 16),
        study_description=_valid_text(ds, "StudyDescription", 64),
        referring_physician=_valid_text(ds, "ReferringPhysicianName", 324),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        modality=_valid_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        body_part_examined=_valid_text(ds, "BodyPartExamined", 16),
        series_description=_valid_text(ds, "SeriesDescription", 64),
        sop_class_uid=_uid(ds, "SOPClassUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        instance_number=_int(ds, "InstanceNumber"),
    )
