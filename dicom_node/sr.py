"""Build (and read back) the DICOM Structured Report that carries the pneumonia result.

The report follows the IHE Radiology "AI Results" (AIR) profile: a Comprehensive 3D SR
(PS3.4 B.5, SOP Class 1.2.840.10008.5.1.4.1.1.88.34) whose content tree is PS3.16 TID 1500
"Imaging Measurement Report", built with highdicom so that the template structure, value types and
relationship types come from a tested implementation rather than hand-written sequences.

Content tree (docs/architecture.md §4)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")            TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants      TID 1204
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID,  TID 1002 / TID 1004
                       Name, Manufacturer, Model Name
      HAS CONCEPT MOD  Procedure Reported = (363679005, SCT, "Imaging procedure")   CID 100
      CONTAINS CONTAINER Imaging Measurements
        CONTAINS CONTAINER Measurement Group                         TID 1501 (one per image)
          HAS OBS CONTEXT  Tracking Identifier / Tracking UID         TID 4108
          CONTAINS CODE    Finding = (233604007, SCT, "Pneumonia")
          HAS CONCEPT MOD  Algorithm Name / Version / Parameters      TID 4019
          CONTAINS NUM     Certainty of Finding (111012, DCM), UCUM "%"   TID 300
            INFERRED FROM SCOORD POLYLINE (region, see below)          TID 320
              SELECTED FROM IMAGE -> the radiograph
          CONTAINS CODE    Pneumonia = Present (52101004) / Absent (272519000)
          CONTAINS IMAGE   Source of Measurement -> the radiograph

What is *not* reported: an image that the classifier does not apply to, or an inference that
failed, produces **no SR**. An SR is a clinical statement placed in the patient's study; "the model
did not run" is an operational fact with no finding, no certainty and nothing a radiologist can act
on, and a "no result" SR would sit in the study forever looking like a result. The reason stays
where operational facts belong: the audit log and the FHIR/HL7 side (docs/architecture.md §3 step 3). This is
why :func:`build_ai_sr` only accepts an :class:`~dicom_node.ai_result.AiResult`, which can only
describe a successful classification. See ``docs/sr.md``.

The region the certainty is inferred from is the whole image, or, for a positive result with a
class activation map, the box around the map's high-activation area (model attention, not a
lesion outline). It is there because OHIF (3.x) places every measurement group on an image through
a spatial coordinate and fails to load a group without one (``docs/sr.md``).

Determinism (docs/architecture.md §3 step 4): the Series and SOP Instance UIDs are derived from the source
UIDs and the model id/version, and every date/time comes from ``result.completed_at`` when it is
set, so a retried job rebuilds the same object and the PACS sees the same instance again instead
of a second report.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from dicom_node.ai_result import AiResult, ResultObjectError
from storage.metadata import is_valid_value
from storage.uids import derive_uid, is_valid_uid

COMPREHENSIVE_3D_SR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.34"

# Codes fixed by docs/architecture.md §4 (SNOMED CT concepts as used by IHE AIR examples).
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
#: Procedure Reported (121058, DCM) of TID 1500 takes its value from CID 100 "Quantitative
#: Diagnostic Imaging Procedures", which has no plain-radiography-of-chest concept (PixelMed's
#: validator reports SCT 399208008 as an error there). "Imaging procedure" is the CID 100 concept
#: that covers a chest radiograph; the chest X-ray itself stays in Performed Procedure Code
#: Sequence, which no context group constrains (docs/sr.md).
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
#: Scaled activation at and above which the class activation map counts as "attention" (the
#: summary image blends its heat map from the same level).
ATTENTION_FLOOR = 0.5
CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")
FINDING = Code("121071", "DCM", "Finding")
PERCENT = Code("%", "UCUM", "Percent")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
#: CID 7005 "Contributing Equipment Purposes of Reference". The closest standard concept for an
#: algorithm that processed the source image into a new instance is (109102, DCM, "Processing
#: Equipment"); (109103, DCM) is "Modifying Equipment" and there is no "Processing Algorithm"
#: concept in CID 7005 (see docs/sr.md).
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")

SERIES_DESCRIPTION = "AI pneumonia result (SR)"

# Type 2 Patient / General Study attributes (PS3.3 C.7.1.1, C.7.2.1): present, possibly empty.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
#: Patient's Sex (0010,0040) Enumerated Values (PS3.3 C.7.1.1); highdicom refuses any other.
_PATIENT_SEX_VALUES = frozenset({"M", "F", "O"})
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})
_REQUIRED_SOURCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class SrBuildError(ResultObjectError):
    """The source dataset cannot be referenced by an AI result SR (e.g. a missing or bad UID)."""


class SrParseError(ResultObjectError):
    """A dataset is not an AI result SR of the shape :func:`build_ai_sr` writes."""


@dataclass(frozen=True)
class AiSrFinding:
    """One TID 1501 measurement group of our SR, read back."""

    tracking_uid: str
    present: bool
    probability_percent: float
    algorithm_name: str
    algorithm_version: str
    algorithm_parameters: tuple[str, ...]
    source_sop_class_uid: str
    source_sop_instance_uid: str


@dataclass(frozen=True)
class AiSrContent:
    """What :func:`read_ai_sr` recovers from an AI result SR (used by tests and by Q/R)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    device_observer_uid: str
    device_observer_name: str | None
    findings: tuple[AiSrFinding, ...]


# --------------------------------------------------------------------------------------- UIDs


def sr_series_uid(study_instance_uid: str, result: AiResult) -> str:
    """Series Instance UID of the AI SR series: one series per study and model version."""
    return derive_uid("sr-series", study_instance_uid, result.model_id, result.model_version)


def sr_instance_uid(source_sop_instance_uid: str, result: AiResult) -> str:
    """SOP Instance UID of the SR: a pure function of (source image, model id, model version)."""
    return derive_uid("sr", source_sop_instance_uid, result.model_id, result.model_version)


def tracking_uid(source_sop_instance_uid: str, result: AiResult) -> str:
    """Tracking Unique Identifier (112040, DCM) of the finding (TID 4108), deterministic too."""
    return derive_uid("sr-tracking", source_sop_instance_uid, result.model_id, result.model_version)


# ------------------------------------------------------------------------------ source checks


def check_source(source: Dataset) -> None:
    """Refuse a source that cannot be referenced (PS3.3 C.17.2 evidence needs all four UIDs).

    A UID from the network is attacker-controlled, and a bad one would end up in a derived UID
    and in the PACS, so it is checked before anything is built.
    """
    if not isinstance(source, Dataset):
        raise SrBuildError(f'Argument "source" must be a pydicom Dataset, got {type(source).__name__}.')
    for keyword in _REQUIRED_SOURCE_UIDS:
        value = source.get(keyword)
        if not is_valid_uid(str(value) if value is not None else None):
            raise SrBuildError(f'Argument "source" has a missing or invalid {keyword}.')
    for keyword in ("Rows", "Columns"):
        if keyword not in source:
            raise SrBuildError(f'Argument "source" is not an image: {keyword} is missing.')


def evidence_header(source: Dataset) -> Dataset:
    """A copy of *source* without bulk data or invalid values, with empty Type 2 Patient/Study
    attributes added.

    highdicom copies the Patient and Study modules from the evidence and reads the Type 2 ones as
    attributes; a source that omitted them (non-conformant, but common in practice) must still
    yield a valid object with the attributes present and empty (PS3.5 §7.4.3).
    Bulk data (pixel data, overlays, LUT data, icon images: every binary VR) is dropped so that
    building a result never deep-copies a whole radiograph; none of it is copied into the result.

    A value that is not valid for its VR (PS3.5 §6.2) is dropped too, at every nesting level
    (:func:`storage.metadata.is_valid_value`): a Patient's Birth Date sent as ``05/04/1923``
    makes highdicom's ``DA()`` raise, which would fail the report of a perfectly good image, and
    copying it would put a non-conformant value into the PACS. A dropped Type 2 attribute is then
    written empty like an absent one. Patient's Sex outside its Enumerated Values M/F/O is dropped
    for the same reason (highdicom refuses it).
    """
    header = _valid_elements(source, top_level=True)
    sex = header.get("PatientSex")
    if sex not in (None, "") and str(sex) not in _PATIENT_SEX_VALUES:
        del header.PatientSex
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _valid_elements(dataset: Dataset, *, top_level: bool = False) -> Dataset:
    """Deep copy of *dataset* keeping only non-bulk elements with valid values (see above)."""
    copied = Dataset()
    for element in dataset:
        if element.VR in _BULK_VRS or element.keyword == "IconImageSequence":
            continue
        if top_level and element.tag.group == 0x0002:
            continue
        if element.VR == "SQ":
            items = [_valid_elements(item) for item in element.value or []]
            copied.add_new(element.tag, "SQ", items)
        elif is_valid_value(element.VR, element.value):
            copied.add(copy.deepcopy(element))
    return copied


def content_datetime(
    source: Dataset, result: AiResult, site_zone: datetime.tzinfo | None = None
) -> datetime.datetime | None:
    """The content date/time to write (aware, in the instance's zone), or None for highdicom's now.

    All date/times of one instance share the instance's Timezone Offset From UTC (PS3.3 C.12.1.1.8).
    The copied Study Date/Time are in the source's offset when it has one, so the timestamp is
    converted into that offset. A source without an offset was written in the site's local time,
    so the timestamp goes into *site_zone* (an IANA zone from ``[dicom] timezone``; None: the
    system's local zone, with its daylight-saving rules for that moment). A naive timestamp is
    taken to be site-local wall-clock time already. Either way the offset is then written
    (:func:`utc_offset_text`), so a reader never mistakes UTC wall-clock time for local time.
    """
    moment = result.completed_at
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=site_zone) if site_zone is not None else moment.astimezone()
    offset = source_utc_offset(source)
    if offset is not None:
        return moment.astimezone(offset)
    return moment.astimezone(site_zone) if site_zone is not None else moment.astimezone()


def utc_offset_text(moment: datetime.datetime) -> str:
    """Timezone Offset From UTC (0008,0201) of an aware *moment*: "+HHMM" / "-HHMM"."""
    offset = moment.utcoffset() or datetime.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def source_utc_offset(source: Dataset) -> datetime.timezone | None:
    """The source's Timezone Offset From UTC (PS3.3 C.12.1.1.8, "+HHMM"/"-HHMM"), or None."""
    raw = str(source.get("TimezoneOffsetFromUTC") or "").strip()
    if len(raw) != 5 or raw[0] not in "+-" or not raw[1:].isdigit():
        return None
    hours, minutes = int(raw[1:3]), int(raw[3:5])
    if hours > 14 or minutes > 59:
        return None
    sign = 1 if raw[0] == "+" else -1
    return datetime.timezone(sign * datetime.timedelta(hours=hours, minutes=minutes))


# -------------------------------------------------------------------------- content builders


def algorithm_identification(result: AiResult) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification: name, version and the parameters that shaped the label.

    The operating threshold is recorded because Present/Absent means nothing without it.
    """
    return hd.sr.AlgorithmIdentification(
        name=result.model_name,
        version=result.model_version,
        parameters=[f"model_id={result.model_id}", f"threshold={result.threshold:g}"],
    )


def device_observer_context(result: AiResult) -> hd.sr.ObserverContext:
    """TID 1002 Observer Context with a Device observer (TID 1004): the model made the finding."""
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result.device_uid,
            name=result.model_name,
            manufacturer_name=result.manufacturer,
            model_name=result.model_name,
        ),
    )


def attention_box(
    cam: npt.NDArray[np.float32], rows: int, columns: int
) -> tuple[float, float, float, float] | None:
    """The (left, top, right, bottom) image-pixel box around the map's high-activation cells.

    The map is min-max scaled like the summary image's heat map; the cells at or above
    :data:`ATTENTION_FLOOR` are bounded and mapped onto the image grid (each map cell covers
    ``rows / h`` by ``columns / w`` pixels). A constant map has no attention area: None.
    """
    low, high = float(cam.min()), float(cam.max())
    if high - low <= 1e-12:
        return None
    hot_rows, hot_columns = np.nonzero((cam - low) / (high - low) >= ATTENTION_FLOOR)
    height, width = cam.shape
    return (
        float(hot_columns.min()) * columns / width,
        float(hot_rows.min()) * rows / height,
        float(hot_columns.max() + 1) * columns / width,
        float(hot_rows.max() + 1) * rows / height,
    )


def measurement_region(source: Dataset, result: AiResult) -> npt.NDArray[np.float32]:
    """Closed POLYLINE (column, row pairs, PS3.3 C.18.6.1.2 image coordinates) the certainty is
    inferred from: the activation box of a positive result, else the whole image.

    OHIF draws a measurement only through such a coordinate (docs/sr.md). A negative result, or one
    without a map, gets the whole image: the classifier looked at all of it, and drawing the
    "hottest" area of a negative map would invite reading a finding into it.
    """
    rows, columns = int(source.Rows), int(source.Columns)
    box = attention_box(result.cam, rows, columns) if result.present and result.cam is not None else None
    left, top, right, bottom = box if box is not None else (0.0, 0.0, float(columns), float(rows))
    corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
    return np.array(corners, dtype=np.float32)


def measurement_group(source: Dataset, result: AiResult) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one source image: finding, Present/Absent, certainty, source, algorithm."""
    algorithm = algorithm_identification(result)
    region = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=measurement_region(source, result),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    certainty = hd.sr.Measurement(
        name=CERTAINTY_OF_FINDING,
        value=float(round(result.probability_percent, 6)),
        unit=PERCENT,
        referenced_coordinates=[region],
    )
    evaluation = hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if result.present else ABSENT)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source.SOPInstanceUID, result),
            identifier=f"{result.model_name} pneumonia finding",
        ),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        measurements=[certainty],
        qualitative_evaluations=[evaluation],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def measurement_report(source: Dataset, result: AiResult) -> hd.sr.MeasurementReport:
    """TID 1500 root: language (default English), device observer, procedure reported, one group.

    Procedure Reported is the *imaging* procedure, not the algorithm (docs/architecture.md §4),
    from CID 100 (:data:`IMAGING_PROCEDURE`).
    """
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer_context(result)),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[measurement_group(source, result)],
    )


def contributing_equipment_item(result: AiResult, when: datetime.datetime | None) -> hd.ContributingEquipment:
    """The single Contributing Equipment Sequence item (PS3.3 C.12.1) that identifies the model.

    Device UID (0018,1002) changes with the model, so a reader can tell which model produced the
    object even when name and version strings were reused. docs/architecture.md §4 puts it in this item;
    dciodvfy (dicom3tools 2022) does not know Device UID inside this sequence and reports the
    object as a "Standard Extended SOP Class" (a warning, not an error). The same UID is also in
    General Equipment and in the SR's Device Observer UID, where it is standard.
    """
    item = hd.ContributingEquipment(
        manufacturer=result.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=result.model_name,
        software_versions=result.model_version,
        contribution_description=f"Pneumonia classification. Intended use: {result.intended_use}",
    )
    item.DeviceUID = result.device_uid
    if when is not None:
        item.ContributionDateTime = pydicom.valuerep.DT(when.replace(tzinfo=None))
    return item


def _apply_timestamps(sop: Dataset, when: datetime.datetime | None) -> None:
    """Make every date/time of the new instance come from the result, for byte-stable rebuilds."""
    if when is None:
        return
    date, time = pydicom.valuerep.DA(when.date()), pydicom.valuerep.TM(when.time())
    sop.InstanceCreationDate, sop.InstanceCreationTime = date, time
    sop.ContentDate, sop.ContentTime = date, time
    sop.SeriesDate, sop.SeriesTime = date, time
    if when.tzinfo is not None:
        sop.TimezoneOffsetFromUTC = utc_offset_text(when)


def _copy_patient_study(sop: Dataset, header: Dataset) -> None:
    """Copy patient/study attributes highdicom's module tables may not cover (PS3.3 C.7.1/C.7.2)."""
    for keyword in ("IssuerOfPatientID", "StudyDescription", "OtherPatientIDsSequence"):
        if keyword in header and keyword not in sop:
            setattr(sop, keyword, copy.deepcopy(header[keyword].value))


# --------------------------------------------------------------------------------- public API


def _comprehensive_3d_sr(
    header: Dataset,
    result: AiResult,
    when: datetime.datetime | None,
    series_number: int,
    instance_number: int,
    institution_name: str | None,
) -> hd.sr.Comprehensive3DSR:
    """highdicom's Comprehensive 3D SR over the cleaned evidence header (see :func:`build_ai_sr`)."""
    return hd.sr.Comprehensive3DSR(
        evidence=[header],
        content=measurement_report(header, result),
        series_instance_uid=sr_series_uid(header.StudyInstanceUID, result),
        series_number=series_number,
        sop_instance_uid=sr_instance_uid(header.SOPInstanceUID, result),
        instance_number=instance_number,
        manufacturer=result.manufacturer,
        manufacturer_model_name=result.model_name,
        software_versions=result.model_version,
        series_description=SERIES_DESCRIPTION,
        institution_name=institution_name,
        is_complete=True,
        is_final=True,
        is_verified=False,
        performed_procedure_codes=[PLAIN_CHEST_XRAY],
        content_date=None if when is None else when.date(),
        content_time=None if when is None else when.time(),
    )


def build_ai_sr(
    source: Dataset,
    result: AiResult,
    *,
    institution_name: str | None = None,
    series_number: int = 9901,
    instance_number: int = 1,
    site_zone: datetime.tzinfo | None = None,
) -> Dataset:
    """Build the IHE AIR Comprehensive 3D SR (TID 1500) reporting *result* for *source*.

    The SR joins the source's study (same Study Instance UID, Patient and Study modules copied),
    in its own series (Modality SR), lists the source in the Current Requested Procedure Evidence
    Sequence (PS3.3 C.17.2), is COMPLETE and UNVERIFIED (no person has reviewed it), FINAL (the
    content of a given model version on a given image never changes; a new model version makes a
    new instance) and carries one Contributing Equipment item for the model.

    Only successful, applicable classifications are reported: a not-applicable image or a failed
    inference produces no SR (see the module docstring and ``docs/sr.md``).

    *site_zone* is the site's time zone for a source without Timezone Offset From UTC (None: the
    system's local zone), see :func:`content_datetime`.

    Raises:
        SrBuildError: the source cannot be referenced (missing/invalid UIDs, not an image), or
            highdicom refuses its header for a reason :func:`evidence_header` does not clean.
    """
    if not isinstance(result, AiResult):
        raise SrBuildError(f'Argument "result" must be an AiResult, got {type(result).__name__}.')
    check_source(source)
    if isinstance(series_number, bool) or not isinstance(series_number, int) or series_number < 1:
        raise SrBuildError(f'Argument "series_number" must be a positive int, got {series_number!r}.')
    if isinstance(instance_number, bool) or not isinstance(instance_number, int) or instance_number < 1:
        raise SrBuildError(f'Argument "instance_number" must be a positive int, got {instance_number!r}.')

    header = evidence_header(source)
    when = content_datetime(source, result, site_zone)
    try:
        sr = _comprehensive_3d_sr(header, result, when, series_number, instance_number, institution_name)
    except (ValueError, TypeError, AttributeError) as exc:
        # Whatever else highdicom refuses in a hostile header: a refusal of this source (a
        # verdict), not a crash to retry. Only the type is kept: the message may quote a value.
        raise SrBuildError(f"highdicom refused the source header ({exc.__class__.__name__})") from exc
    # General Equipment (PS3.3 C.7.5.1) describes the model, so it carries its Device UID too.
    sr.DeviceUID = result.device_uid
    # highdicom adds the source's acquisition equipment and itself; docs/architecture.md §4 asks for exactly
    # one item identifying the model (the acquisition equipment stays described in the source).
    sr.ContributingEquipmentSequence = [contributing_equipment_item(result, when)]
    _copy_patient_study(sr, header)
    _apply_timestamps(sr, when)
    return sr


def read_ai_sr(dataset: Dataset) -> AiSrContent:
    """Parse an SR written by :func:`build_ai_sr` back with highdicom.

    Raises:
        SrParseError: not a Comprehensive 3D SR with a TID 1500 tree and a device observer, or a
            measurement group lacks the pneumonia evaluation, the certainty or the source image.
    """
    if dataset.get("SOPClassUID") != COMPREHENSIVE_3D_SR_SOP_CLASS_UID:
        raise SrParseError("Dataset is not a Comprehensive 3D SR.")
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    except (ValueError, AttributeError, TypeError) as exc:
        raise SrParseError(f"Dataset is not a readable SR: {exc}") from exc
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise SrParseError("SR content is not a TID 1500 Measurement Report.")
    observers = report.get_observer_contexts(observer_type=codes.cid270.Device)
    if not observers:
        raise SrParseError("SR has no device observer context.")
    device = observers[0].observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    findings = tuple(
        _read_group(group) for group in report.get_image_measurement_groups(finding_type=PNEUMONIA)
    )
    if not findings:
        raise SrParseError("SR has no pneumonia measurement group.")
    return AiSrContent(
        sop_instance_uid=str(dataset.SOPInstanceUID),
        series_instance_uid=str(dataset.SeriesInstanceUID),
        study_instance_uid=str(dataset.StudyInstanceUID),
        device_observer_uid=str(device.uid),
        device_observer_name=device.name,
        findings=findings,
    )


def _read_group(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> AiSrFinding:
    evaluations = group.get_qualitative_evaluations(name=PNEUMONIA)
    if len(evaluations) != 1:
        raise SrParseError("Measurement group must have exactly one Pneumonia evaluation.")
    value = evaluations[0].value
    if value == PRESENT:
        present = True
    elif value == ABSENT:
        present = False
    else:
        raise SrParseError(f"Pneumonia evaluation has an unexpected value {value!r}.")
    certainties = group.get_measurements(name=CERTAINTY_OF_FINDING)
    if len(certainties) != 1:
        raise SrParseError("Measurement group must have exactly one Certainty of Finding.")
    if certainties[0].unit != PERCENT:
        raise SrParseError("Certainty of Finding is not in UCUM '%'.")
    sources = group.source_images
    if len(sources) != 1:
        raise SrParseError("Measurement group must reference exactly one source image.")
    reference = sources[0].referenced_sop_class_uid, sources[0].referenced_sop_instance_uid
    texts = _algorithm_texts(group)
    if not texts[ALGORITHM_NAME] or not texts[ALGORITHM_VERSION]:
        raise SrParseError("Measurement group has no TID 4019 Algorithm Identification.")
    uid = group.tracking_uid
    if uid is None:
        raise SrParseError("Measurement group has no Tracking UID.")
    return AiSrFinding(
        tracking_uid=str(uid),
        present=present,
        probability_percent=float(certainties[0].value),
        algorithm_name=texts[ALGORITHM_NAME][0],
        algorithm_version=texts[ALGORITHM_VERSION][0],
        algorithm_parameters=tuple(texts[ALGORITHM_PARAMETERS]),
        source_sop_class_uid=str(UID(reference[0])),
        source_sop_instance_uid=str(UID(reference[1])),
    )


def _algorithm_texts(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[Code, list[str]]:
    """TID 4019 items directly under the group container (highdicom has no reader for them)."""
    found: dict[Code, list[str]] = {ALGORITHM_NAME: [], ALGORITHM_VERSION: [], ALGORITHM_PARAMETERS: []}
    for item in group[0].ContentSequence:
        if item.ValueType != "TEXT":
            continue
        concept = item.ConceptNameCodeSequence[0]
        for code, values in found.items():
            if concept.CodeValue == code.value and concept.CodingSchemeDesignator == code.scheme_designator:
                values.append(str(item.TextValue))
    return found
