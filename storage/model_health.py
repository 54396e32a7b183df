"""The operator console's "Model" page data: plain values that inference fills and the web layer shows.

Why here: the console lives in ``fhir_api``, which may not import ``inference`` (import-linter
contracts in pyproject.toml); both may import ``storage``. So the contract between the two is
these frozen dataclasses, which name nothing from either side, and the one piece of it that is a
query of its own (:func:`probability_histogram`). ``inference/model_health.py`` builds a
:class:`ModelHealth` from the model package, the monitoring settings and the database.

PHI-free by construction, like :mod:`storage.monitoring`: only probabilities, input statistics,
statuses, labels and creation times of results are read — no instance, study or patient column.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from storage.models import InferenceResult
from storage.monitoring import WindowSample, analysed, clean_input_stats

#: ``CurrentDrift.state`` values (the same strings as inference/drift.py's ``DriftReport.state``).
NO_REFERENCE = "no reference"
TOO_FEW_SAMPLES = "too few samples"
STABLE = "stable"
DRIFT = "drift"


@dataclass(frozen=True)
class FeaturePsi:
    """One monitored quantity over the current window: its PSI (None: fewer than ``min_samples``
    results carry it) and whether that PSI is above the alert threshold."""

    feature: str
    samples: int
    psi: float | None
    alert: bool


@dataclass(frozen=True)
class CurrentDrift:
    """The drift verdict over the newest window (mirrors inference/drift.py ``DriftReport``)."""

    state: str  # NO_REFERENCE, TOO_FEW_SAMPLES, STABLE or DRIFT
    window: int  # monitoring.drift_window: the window's nominal size
    samples: int  # analysed results actually in it
    min_samples: int
    psi_alert: float
    features: tuple[FeaturePsi, ...] = ()

    @property
    def alert(self) -> bool:
        """True when any feature's PSI is above ``psi_alert``."""
        return self.state == DRIFT


@dataclass(frozen=True)
class DriftPoint:
    """One window of the drift history: ``images`` consecutive analysed results ending at
    ``window_end`` (the newest one's creation time), their PSI per feature against the package's
    reference (only the features with enough samples) and the share labelled positive."""

    window_end: dt.datetime
    images: int
    psi: Mapping[str, float]
    max_psi: float | None  # None: no feature had enough samples (or there is no reference)
    positive_rate: float | None  # None: no result of the window carries a label
    alert: bool


@dataclass(frozen=True)
class ProbabilityHistogram:
    """Reported probabilities of a model version's analysed results, in ``len(edges) - 1`` equal bins.

    Bin ``i`` holds ``edges[i] <= p < edges[i + 1]``; the last bin also holds ``p == 1.0`` (and
    anything above), the first anything below 0. ``at_or_above_threshold`` counts ``p >= threshold``
    exactly (a bin may straddle the threshold, so it cannot be read off the counts)."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    threshold: float | None
    total: int
    at_or_above_threshold: int = 0


@dataclass(frozen=True)
class ModelHealth:
    """Everything the console's "Model" page shows about the model version in use."""

    model_id: str
    version: str
    name: str
    manufacturer: str
    intended_use: str
    threshold: float  # on the reported (calibrated) probability scale
    manifest: Mapping[str, Any]  # the package's model.json as loaded (it holds no secret)
    model_card: str | None  # the package's MODEL_CARD.md (Markdown), None when it ships none
    drift_points: tuple[DriftPoint, ...]  # oldest first
    probability_histogram: ProbabilityHistogram
    current_drift: CurrentDrift
    results_by_status: Mapping[str, int] = field(default_factory=dict)  # ResultStatus value -> count


@dataclass(frozen=True, kw_only=True)
class DatedSample(WindowSample):
    """A drift window sample with what the history needs besides: when it was made and its label
    (a subclass, so that a list of them is a window for inference/drift.py ``evaluate``)."""

    created_at: dt.datetime
    label: str | None = None


def histogram_edges(bins: int) -> tuple[float, ...]:
    """``bins + 1`` equally spaced edges from 0 to 1 (exact at both ends)."""
    if bins < 1:
        raise ValueError(f"bins: need at least 1, got {bins}")
    return tuple(i / bins for i in range(bins + 1))


def probability_histogram(
    session: Session, model_id: str, version: str, bins: int = 20, *, threshold: float | None = None
) -> ProbabilityHistogram:
    """The histogram of the reported probability of *model_id* *version*'s results with status ``ok``.

    Bucketed in SQL (one grouped query, no row leaves the database), with the bin found by
    comparing against the very edges returned, so that a probability equal to an edge lands in the
    bin the edge opens, as in inference/drift.py's ``bin_fractions``. *threshold* (reported scale)
    defaults to the one stored with the newest such result."""
    edges = histogram_edges(bins)
    conditions = analysed(model_id, version)
    if threshold is None:
        threshold = session.scalar(
            select(InferenceResult.threshold).where(*conditions, InferenceResult.threshold.is_not(None))
            .order_by(InferenceResult.created_at.desc(), InferenceResult.id.desc()).limit(1)
        )
    probability = InferenceResult.probability
    counts = [0] * bins
    if bins == 1:
        counts[0] = int(session.scalar(select(func.count()).where(*conditions)) or 0)
    else:
        bucket = case(*[(probability < edge, i) for i, edge in enumerate(edges[1:-1])], else_=bins - 1).label("bucket")
        for index, count in session.execute(select(bucket, func.count()).where(*conditions).group_by(bucket)):
            counts[int(index)] += int(count)
    above = 0
    if threshold is not None:
        above = int(session.scalar(select(func.count()).where(*conditions, probability >= threshold)) or 0)
    return ProbabilityHistogram(
        edges=edges, counts=tuple(counts), threshold=threshold, total=sum(counts), at_or_above_threshold=above,
    )


def results_by_status(session: Session, model_id: str, version: str) -> dict[str, int]:
    """How many results of *model_id* *version* there are per status (every revision counts)."""
    query = (
        select(InferenceResult.status, func.count())
        .where(InferenceResult.model_id == model_id, InferenceResult.model_version == version)
        .group_by(InferenceResult.status)
    )
    return {str(status): int(count) for status, count in session.execute(query)}


def dated_results(session: Session, model_id: str, version: str, limit: int) -> list[DatedSample]:
    """The newest *limit* analysed results of *model_id* *version*, newest first, in the order of
    storage/monitoring.py ``recent_results`` (so the first ``drift_window`` of them are its window)."""
    if limit <= 0:
        return []
    query = (
        select(InferenceResult.probability, InferenceResult.input_stats, InferenceResult.created_at, InferenceResult.label)
        .where(*analysed(model_id, version))
        .order_by(InferenceResult.created_at.desc(), InferenceResult.id.desc())
        .limit(limit)
    )
    samples = []
    for probability, stats, created_at, label in session.execute(query):
        if probability is None:  # excluded by the query; narrows the type
            continue
        samples.append(DatedSample(float(probability), clean_input_stats(stats), created_at=created_at, label=label))
    return samples
