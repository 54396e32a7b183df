"""The rolling window of drift monitoring: the newest analysed results of one model version.

PHI-free by construction: only the reported probability and the input statistics
(``inference_result.input_stats``) are read — no instance, study or patient column — so what
inference/drift.py and ``pneumo status`` compute from it can be shown anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from storage.models import InferenceResult, ResultStatus


@dataclass(frozen=True)
class WindowSample:
    """One analysed image of the window: its reported probability and input statistics (empty for
    results made before the statistics were recorded)."""

    probability: float
    input_stats: dict[str, float] = field(default_factory=dict)


def recent_results(session: Session, model_id: str, version: str, limit: int) -> list[WindowSample]:
    """The newest *limit* results with status ``ok`` of *model_id* *version*, newest first."""
    if limit <= 0:
        return []
    query = (
        select(InferenceResult.probability, InferenceResult.input_stats)
        .where(*analysed(model_id, version))
        .order_by(InferenceResult.created_at.desc(), InferenceResult.id.desc())
        .limit(limit)
    )
    samples = []
    for probability, stats in session.execute(query):
        if probability is None:  # excluded by the query; narrows the type
            continue
        samples.append(WindowSample(float(probability), clean_input_stats(stats)))
    return samples


def clean_input_stats(stats: object) -> dict[str, float]:
    """The numeric entries of a stored ``input_stats`` column (NULL or malformed: none)."""
    if not isinstance(stats, dict):
        return {}
    return {str(k): float(v) for k, v in stats.items() if isinstance(v, (int, float))}


def analysed(model_id: str, version: str) -> list[ColumnElement[bool]]:
    """The conditions of "an analysed result of *model_id* *version*" (status ``ok``, a probability)."""
    return [
        InferenceResult.model_id == model_id,
        InferenceResult.model_version == version,
        InferenceResult.status == ResultStatus.OK,
        InferenceResult.probability.is_not(None),
    ]
