"""The DICOM result objects behind the result job's :class:`~storage.results.ReportBuilder` port.

Maps a stored verdict and the model's identity onto :class:`~dicom_node.ai_result.AiResult` and
hands it to the pure builders: the TID 1500 SR (:mod:`dicom_node.sr`) and the summary Secondary
Capture (:mod:`dicom_node.summary_image`). Their series numbers are fixed (9901 SR, 9902
summary) so a viewer shows the AI objects last; Instance Numbers come from the caller and are
distinct within each series.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.ai_result import AiResult, AiResultError, ResultObjectError
from dicom_node.sr import build_ai_sr
from dicom_node.summary_image import SummaryImageError, build_summary_image
from storage.results import DisplayImage, ImageVerdict, ModelIdentity

SR_SERIES_NUMBER = 9901
SUMMARY_SERIES_NUMBER = 9902


def ai_result(verdict: ImageVerdict, model: ModelIdentity, completed_at: dt.datetime) -> AiResult:
    """What the DICOM builders take, from a verdict (validated when built: AiResultError)."""
    if verdict.probability is None or verdict.threshold is None:
        raise AiResultError("a report needs a probability and a threshold (only 'ok' verdicts are reported)")
    return AiResult(
        probability=verdict.probability,
        threshold=verdict.threshold,
        model_id=model.model_id,
        model_name=model.name,
        model_version=model.version,
        manufacturer=model.manufacturer,
        device_uid=model.device_uid,
        intended_use=model.intended_use,
        cam=None if verdict.cam is None else np.asarray(verdict.cam, dtype=np.float32),
        completed_at=completed_at,
    )


class DicomReports:
    """The SR and the summary image for one image verdict (pure; see the module docstring).

    *timezone* is ``settings.dicom.timezone`` (an IANA name): the zone of the objects' date/times
    when the source has no Timezone Offset From UTC; None uses the system's local zone.
    """

    def __init__(self, timezone: str | None = None) -> None:
        self._zone: dt.tzinfo | None = None if timezone is None else ZoneInfo(timezone)

    def structured_report(
        self, source: Dataset, verdict: ImageVerdict, model: ModelIdentity, completed_at: dt.datetime, instance_number: int
    ) -> Dataset:
        return build_ai_sr(
            source, ai_result(verdict, model, completed_at),
            series_number=SR_SERIES_NUMBER, instance_number=instance_number, site_zone=self._zone,
        )

    def summary_image(
        self,
        source: Dataset,
        display: DisplayImage,
        verdict: ImageVerdict,
        model: ModelIdentity,
        completed_at: dt.datetime,
        instance_number: int,
    ) -> Dataset:
        try:
            return build_summary_image(
                source, display, ai_result(verdict, model, completed_at),
                series_number=SUMMARY_SERIES_NUMBER, instance_number=instance_number, site_zone=self._zone,
            )
        except ResultObjectError:
            raise
        except (ValueError, TypeError) as exc:  # highdicom refused a value copied from the source
            # The message may quote the refused value (PHI); name the exception type only.
            raise SummaryImageError(f"highdicom refused the source header ({exc.__class__.__name__})") from exc
