"""One file in, one outcome out: what ``pneumo infer FILE.dcm`` and the worker call.

Not applicable is an outcome, not an exception (docs/architecture.md §3 step 3); unreadable files and
undecodable pixel data raise the typed errors of :mod:`inference.errors` so the caller can
record them.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from types import MappingProxyType

import pydicom
from pydicom.errors import InvalidDicomError

from inference.applicability import ApplicabilityRules, SiteRules, assess, resolve_rules
from inference.engine import InferenceEngine, Prediction
from inference.errors import CorruptPixelDataError, UnsupportedImageError
from inference.input_stats import input_statistics
from inference.preprocess import FloatArray, preprocess


@dataclass(frozen=True, slots=True)
class ClassificationOutcome:
    """The result for one instance. ``prediction`` is None when not applicable.

    ``timings_ms``: read (file parse), decode, preprocess, infer, total — each present when the
    stage ran. ``input_stats``: :func:`inference.input_stats.input_statistics` of the model
    input (drift monitoring), None when not applicable.
    """

    sop_instance_uid: str
    applicable: bool
    reason: str | None
    prediction: Prediction | None
    timings_ms: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    display: FloatArray | None = None
    input_stats: Mapping[str, float] | None = None


def classify_file(
    path: str | PathLike[str],
    engine: InferenceEngine,
    rules: ApplicabilityRules | SiteRules | None = None,
) -> ClassificationOutcome:
    """Read *path*, check applicability, preprocess and predict.

    *rules*: explicit :class:`ApplicabilityRules`, or the site's :class:`SiteRules` merged with the
    engine's model's intended use; None checks exactly the model's intended use.

    Raises :class:`UnsupportedImageError` for a file that is not DICOM,
    :class:`CorruptPixelDataError` for a truncated/malformed one, the other
    :class:`~inference.errors.PreprocessingError` subclasses for pixel data that cannot be used,
    and ``OSError`` when the file cannot be opened at all.
    """
    t0 = time.perf_counter()
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise UnsupportedImageError(f"not a DICOM file: {exc}") from exc
    except (EOFError, ValueError, struct.error) as exc:  # truncated or malformed data set
        raise CorruptPixelDataError(
            f"unreadable DICOM data set: {type(exc).__name__}: {exc}"
        ) from exc
    t_read = (time.perf_counter() - t0) * 1e3
    return classify_dataset(ds, engine, rules, read_ms=t_read)


def classify_dataset(
    ds: pydicom.Dataset,
    engine: InferenceEngine,
    rules: ApplicabilityRules | SiteRules | None = None,
    *,
    display_max_side: int | None = None,
    read_ms: float = 0.0,
) -> ClassificationOutcome:
    """Classify an already-read dataset; with *display_max_side*, the outcome also carries the
    display image (same decode, same window) for the summary image."""
    t0 = time.perf_counter() - read_ms / 1e3
    t_read = read_ms
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    verdict = assess(ds, resolve_rules(rules, engine.manifest.intended), pixels_loaded=True)
    if not verdict.applicable:
        total = (time.perf_counter() - t0) * 1e3
        return ClassificationOutcome(
            sop_instance_uid=sop_uid,
            applicable=False,
            reason=verdict.reason,
            prediction=None,
            timings_ms=MappingProxyType({"read": t_read, "total": total}),
        )
    prepared = preprocess(ds, engine.manifest.preprocessing, display_max_side=display_max_side)
    prediction = engine.predict(prepared.tensor, prepared.timings_ms)
    timings = {"read": t_read, **prediction.timings_ms, "total": (time.perf_counter() - t0) * 1e3}
    return ClassificationOutcome(
        sop_instance_uid=sop_uid,
        applicable=True,
        reason=None,
        prediction=prediction,
        timings_ms=MappingProxyType(timings),
        display=prepared.display,
        input_stats=MappingProxyType(input_statistics(prepared.tensor)),
    )
