"""The classifier result as the DICOM result builders see it.

``dicom_node`` must not import ``inference`` (docs/architecture.md §2), so the gateway maps the inference
part's output onto :class:`AiResult` and hands it to :func:`dicom_node.sr.build_ai_sr` and
:func:`dicom_node.summary_image.build_summary_image`.

The object validates itself when built (docs/architecture.md §6.3, highdicom style: each message names the
argument), because every value ends up in a DICOM attribute with a VR that has rules of its own
(PS3.5 §6.2: LO is at most 64 characters and may not contain a backslash or control characters).
Catching a bad value here gives the worker one clear error instead of an invalid object reaching
the PACS.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from conf.errors import InvalidInputError
from dicom_node.errors import DicomNodeError
from storage.uids import is_valid_uid

#: PS3.5 Table 6.2-1: LO (Long String) holds at most 64 characters.
LO_MAX_CHARS = 64
#: PS3.5 Table 6.2-1: ST (Short Text) holds at most 1024 characters. The intended use ends up in
#: Contribution Description (0018,A003), an ST.
ST_MAX_CHARS = 1024


class ResultObjectError(DicomNodeError, InvalidInputError, ValueError):
    """Base class for every error raised while building or reading a DICOM result object.

    Part of the dicom_node exception tree (docs/architecture.md §6.4) and a ``ValueError``: these are bad
    inputs to pure functions, raised in the worker, never at a DIMSE boundary.
    """


class AiResultError(ResultObjectError):
    """An :class:`AiResult` argument is invalid; the message names the argument."""


def _check_probability(name: str, value: object) -> float:
    """A real number in [0, 1]; ``bool`` and NaN are rejected (they are programming errors)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise AiResultError(f'Argument "{name}" must be a real number, got {type(value).__name__}.')
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise AiResultError(f'Argument "{name}" must be within [0, 1], got {number!r}.')
    return number


def _check_lo(name: str, value: object) -> str:
    """A non-empty string that is a valid LO value (PS3.5 §6.2): ≤ 64 chars, no ``\\``/controls."""
    if not isinstance(value, str):
        raise AiResultError(f'Argument "{name}" must be a str, got {type(value).__name__}.')
    if not value.strip():
        raise AiResultError(f'Argument "{name}" must not be empty.')
    if value != value.strip():
        raise AiResultError(f'Argument "{name}" must not have leading or trailing spaces.')
    if len(value) > LO_MAX_CHARS:
        raise AiResultError(
            f'Argument "{name}" must be at most {LO_MAX_CHARS} characters (DICOM LO), got {len(value)}.'
        )
    if "\\" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise AiResultError(
            f'Argument "{name}" must not contain a backslash or control characters (DICOM LO).'
        )
    return value


def _check_text(name: str, value: object, max_chars: int) -> str:
    """A non-empty single-paragraph text (ST-compatible, PS3.5 §6.2)."""
    if not isinstance(value, str):
        raise AiResultError(f'Argument "{name}" must be a str, got {type(value).__name__}.')
    if not value.strip():
        raise AiResultError(f'Argument "{name}" must not be empty.')
    if len(value) > max_chars:
        raise AiResultError(f'Argument "{name}" must be at most {max_chars} characters, got {len(value)}.')
    if "\\" in value or any(ord(c) < 0x20 and c not in "\r\n\t" for c in value):
        raise AiResultError(f'Argument "{name}" must not contain a backslash or control characters.')
    return value


def _check_cam(value: object) -> npt.NDArray[np.float32] | None:
    """A finite, non-empty 2-D floating-point map, copied into a read-only float32 array.

    Copying and freezing keeps the dataclass honest about being immutable: the caller's array
    cannot change the result after validation.
    """
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise AiResultError(f'Argument "cam" must be a numpy array or None, got {type(value).__name__}.')
    if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise AiResultError(f'Argument "cam" must be a non-empty 2-D array [h, w], got shape {value.shape}.')
    if not np.issubdtype(value.dtype, np.floating):
        raise AiResultError(f'Argument "cam" must have a floating-point dtype, got {value.dtype}.')
    if not bool(np.all(np.isfinite(value))):
        raise AiResultError('Argument "cam" must contain only finite values.')
    cam = np.array(value, dtype=np.float32, copy=True)
    cam.setflags(write=False)
    return cam


def _check_timestamp(name: str, value: object) -> datetime.datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime.datetime):
        raise AiResultError(f'Argument "{name}" must be a datetime or None, got {type(value).__name__}.')
    return value


@dataclass(frozen=True)
class AiResult:
    """One applicable, successful classification of one radiograph.

    Only successful inferences are represented: a not-applicable image or a failed inference has
    nothing clinical to report and produces no DICOM result object (see ``docs/sr.md``).

    Attributes:
        probability: model output for pneumonia, in [0, 1].
        threshold: operating point; ``present`` is ``probability >= threshold``. Must be in
            (0, 1): a threshold of 0 or 1 makes the label independent of the image.
        model_id: stable identifier of the model; part of every derived UID.
        model_name: human-readable model name (Manufacturer's Model Name, LO).
        model_version: model version (Software Versions, LO); part of every derived UID, so a new
            model version yields a new report instead of overwriting the old one.
        manufacturer: who made the model (Manufacturer, LO).
        device_uid: UID of the model as a device (Device Observer UID, TID 1004; Device UID
            (0018,1002)). It must change whenever the model changes (docs/architecture.md §4).
        intended_use: short intended-use statement shown in the banner and recorded in the
            Contribution Description (ST).
        cam: class activation map [h, w] (any finite scale) or None.
        started_at / completed_at: inference timestamps; ``completed_at`` becomes the content
            date/time so that rebuilding gives an identical object.
        present: derived, never passed: ``probability >= threshold``.
    """

    probability: float
    threshold: float
    model_id: str
    model_name: str
    model_version: str
    manufacturer: str
    device_uid: str
    intended_use: str
    cam: npt.NDArray[np.float32] | None = field(default=None, compare=False, repr=False)
    started_at: datetime.datetime | None = None
    completed_at: datetime.datetime | None = None
    present: bool = field(init=False)

    def __post_init__(self) -> None:
        probability = _check_probability("probability", self.probability)
        threshold = _check_probability("threshold", self.threshold)
        if not 0.0 < threshold < 1.0:
            raise AiResultError(f'Argument "threshold" must be strictly between 0 and 1, got {threshold!r}.')
        values: dict[str, Any] = {
            "probability": probability,
            "threshold": threshold,
            "model_id": _check_lo("model_id", self.model_id),
            "model_name": _check_lo("model_name", self.model_name),
            "model_version": _check_lo("model_version", self.model_version),
            "manufacturer": _check_lo("manufacturer", self.manufacturer),
            "intended_use": _check_text("intended_use", self.intended_use, ST_MAX_CHARS),
            "cam": _check_cam(self.cam),
            "started_at": _check_timestamp("started_at", self.started_at),
            "completed_at": _check_timestamp("completed_at", self.completed_at),
        }
        if not is_valid_uid(self.device_uid):
            raise AiResultError(f'Argument "device_uid" must be a valid DICOM UID, got {self.device_uid!r}.')
        started, completed = values["started_at"], values["completed_at"]
        if started is not None and completed is not None:
            if (started.tzinfo is None) != (completed.tzinfo is None):
                raise AiResultError(
                    'Arguments "started_at" and "completed_at" must both be naive or both be aware.'
                )
            if completed < started:
                raise AiResultError('Argument "completed_at" must not be earlier than "started_at".')
        values["present"] = probability >= threshold
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def probability_percent(self) -> float:
        """The probability as a percentage, the unit of Certainty of Finding (111012, DCM)."""
        return self.probability * 100.0
