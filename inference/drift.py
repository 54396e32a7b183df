"""Model drift: the population stability index (PSI) of recent inputs and outputs against the
model package's training reference, and the Prometheus collector that exposes it.

What is compared (docs/model.md, "Model monitoring"): the reported probability and the input
statistics of :mod:`inference.input_stats`, over the rolling window of the newest analysed
results of the model version in use (:func:`storage.monitoring.recent_results`), against the
binned distributions in ``model.json`` → ``monitoring.reference`` (:mod:`inference.reference`).

PSI (Siddiqi, *Credit Risk Scorecards*, 2006; the usual reading: < 0.1 stable, 0.1-0.25
moderate shift, > 0.25 significant shift)::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

with e_i the reference fraction of bin i, a_i the window's; an empty bin on either side counts as
:data:`EPSILON` so that the sum stays finite. Below ``drift_min_samples`` results there is no
verdict (sampling noise alone makes the PSI of a few dozen images large).

The computation is pure (:func:`psi`, :func:`evaluate`); :class:`DriftCollector` runs it at scrape
time. Nothing here names a patient: the labels are the model id, version and feature name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from conf.settings import MonitoringSettings
from inference.input_stats import INPUT_FEATURES
from inference.manifest import ModelManifest
from inference.reference import PROBABILITY, DriftReference, FeatureReference
from storage.db import Database
from storage.monitoring import WindowSample, recent_results

log = structlog.get_logger(__name__)

#: Stand-in for an empty bin's fraction (reference or window) in the PSI sum.
EPSILON = 1e-4
#: Every monitored quantity, in report order.
FEATURES: tuple[str, ...] = (PROBABILITY, *INPUT_FEATURES)

#: ``DriftReport.state`` values.
NO_REFERENCE = "no reference"
TOO_FEW_SAMPLES = "too few samples"
STABLE = "stable"
DRIFT = "drift"


def bin_fractions(values: Sequence[float] | np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Fractions of *values* in the bins cut by the interior *edges* (``edges[i-1] <= x < edges[i]``,
    open ends; ``len(edges) + 1`` bins). Raises ``ValueError`` when *values* is empty."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("values: empty, no distribution")
    counts = np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right"), minlength=len(edges) + 1)
    return np.asarray(counts / x.size, dtype=np.float64)


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray, epsilon: float = EPSILON) -> float:
    """The population stability index of *actual* against *expected* bin fractions (same bins)."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1 or e.size == 0:
        raise ValueError(f"expected/actual: need two equally long non-empty 1-D fractions, got {e.shape} and {a.shape}")
    e = np.where(e > 0, e, epsilon)
    a = np.where(a > 0, a, epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def feature_psi(reference: FeatureReference, values: Sequence[float] | np.ndarray, epsilon: float = EPSILON) -> float:
    """PSI of *values* against one feature's reference bins."""
    return psi(reference.fractions, bin_fractions(values, reference.edges), epsilon)


@dataclass(frozen=True)
class FeatureDrift:
    """One quantity's PSI over the window (None: too few samples with it) and its verdict."""

    feature: str
    samples: int
    psi: float | None
    alert: bool


@dataclass(frozen=True)
class DriftReport:
    """The drift verdict for one model version over one window."""

    model_id: str
    version: str
    state: str  # NO_REFERENCE, TOO_FEW_SAMPLES, STABLE or DRIFT
    window: int
    samples: int
    min_samples: int
    psi_alert: float
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def alert(self) -> bool:
        return self.state == DRIFT

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id, "version": self.version, "state": self.state, "alert": self.alert,
            "window": self.window, "samples": self.samples, "min_samples": self.min_samples,
            "psi_alert": self.psi_alert,
            "features": [
                {"feature": f.feature, "samples": f.samples, "psi": None if f.psi is None else round(f.psi, 4), "alert": f.alert}
                for f in self.features
            ],
        }


def site_reference(
    reference: DriftReference,
    to_reported: Callable[[float], float],
    *,
    prevalence: float | None = None,
    labels: tuple[str, str] | None = None,
) -> dict[str, FeatureReference]:
    """The reference's features as this site should see them: the probability bins on the
    reported (calibrated) scale and, with *prevalence* (the expected share of ``labels[1]``, the
    positive label, beside ``labels[0]``), every feature that has per-label fractions mixed at it."""
    features = dict(reference.features)
    if PROBABILITY in features and reference.probability_scale == "raw":
        features[PROBABILITY] = features[PROBABILITY].mapped(to_reported)
    if prevalence is not None and labels is not None:
        negative, positive = labels
        features = {
            name: ref.at_prevalence(positive, negative, prevalence) if {positive, negative} <= set(ref.by_label) else ref
            for name, ref in features.items()
        }
    return features


def evaluate(
    model_id: str,
    version: str,
    reference: Mapping[str, FeatureReference] | None,
    samples: Sequence[WindowSample],
    settings: MonitoringSettings,
) -> DriftReport:
    """Compare the window *samples* (newest first, at most ``drift_window``) with *reference*
    (features by name, probability on the reported scale; None: the package has none)."""
    window = list(samples[: settings.drift_window])
    base: dict[str, Any] = {
        "model_id": model_id, "version": version, "window": settings.drift_window, "samples": len(window),
        "min_samples": settings.drift_min_samples, "psi_alert": settings.drift_psi_alert,
    }
    if reference is None:
        return DriftReport(state=NO_REFERENCE, **base)
    features = []
    for name in [f for f in FEATURES if f in reference] + sorted(set(reference) - set(FEATURES)):
        values = [s.probability if name == PROBABILITY else s.input_stats.get(name) for s in window]
        present = [float(v) for v in values if v is not None and math.isfinite(v)]
        if len(present) < settings.drift_min_samples:
            features.append(FeatureDrift(name, len(present), None, False))
            continue
        value = feature_psi(reference[name], present)
        features.append(FeatureDrift(name, len(present), value, value > settings.drift_psi_alert))
    if not any(f.psi is not None for f in features):
        state = TOO_FEW_SAMPLES
    else:
        state = DRIFT if any(f.alert for f in features) else STABLE
    return DriftReport(state=state, features=features, **base)


def manifest_reference(manifest: ModelManifest, settings: MonitoringSettings) -> dict[str, FeatureReference] | None:
    """*manifest*'s drift reference as this site should see it (:func:`site_reference`); None: it has none."""
    reference = manifest.drift_reference
    return None if reference is None else site_reference(
        reference, manifest.calibration.apply, prevalence=settings.drift_prevalence,
        labels=(manifest.negative_label, manifest.positive_label),
    )


def model_drift(database: Database, manifest: ModelManifest, settings: MonitoringSettings) -> DriftReport:
    """The drift report of *manifest*'s model version from the results in *database*."""
    features = manifest_reference(manifest, settings)
    with database.read_session() as session:
        window = recent_results(session, manifest.id, manifest.version, settings.drift_window)
    return evaluate(manifest.id, manifest.version, features, window, settings)


class DriftCollector(Collector):
    """Prometheus collector: computes the drift report at scrape time (one bounded query).

    ``pneumo_model_drift_psi{model,version,feature}`` (absent while a feature has too few samples),
    ``pneumo_model_drift_alert{model,version,feature}`` 0/1 and ``pneumo_model_drift_alert{model,
    version,feature="any"}``, ``pneumo_model_drift_window_samples{model,version}``,
    ``pneumo_model_drift_reference{model,version}`` (1: the package carries a reference) and
    ``pneumo_model_drift_threshold`` (the PSI alert threshold).
    """

    def __init__(self, database: Database, manifest: ModelManifest, settings: MonitoringSettings) -> None:
        self._database = database
        self._manifest = manifest
        self._settings = settings

    def describe(self) -> Iterable[Metric]:
        # Describing without a query keeps registration free of database access.
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        try:
            report: DriftReport | None = model_drift(self._database, self._manifest, self._settings)
        except SQLAlchemyError as exc:  # the scrape still answers; the gauges are absent meanwhile
            log.warning("metrics.drift_unavailable", error=exc.__class__.__name__)
            report = None
        yield from self._families(report)

    def _families(self, report: DriftReport | None = None) -> Iterator[Metric]:
        labels = ["model", "version"]
        psi_family = GaugeMetricFamily(
            "pneumo_model_drift_psi", "Population stability index of a monitored feature over the drift window "
            "against the model package's training reference (>0.25: significant shift)", labels=[*labels, "feature"])
        alert_family = GaugeMetricFamily(
            "pneumo_model_drift_alert", "1 when a feature's PSI exceeds monitoring.drift_psi_alert "
            "(feature=\"any\": any feature)", labels=[*labels, "feature"])
        samples_family = GaugeMetricFamily(
            "pneumo_model_drift_window_samples", "Analysed results in the drift window", labels=labels)
        reference_family = GaugeMetricFamily(
            "pneumo_model_drift_reference", "1 when the model package carries a drift reference", labels=labels)
        threshold_family = GaugeMetricFamily(
            "pneumo_model_drift_threshold", "PSI above which a feature raises the drift alert",
            value=self._settings.drift_psi_alert)
        if report is not None:
            key = [report.model_id, report.version]
            for entry in report.features:
                if entry.psi is not None:
                    psi_family.add_metric([*key, entry.feature], entry.psi)
                alert_family.add_metric([*key, entry.feature], 1.0 if entry.alert else 0.0)
            alert_family.add_metric([*key, "any"], 1.0 if report.alert else 0.0)
            samples_family.add_metric(key, float(report.samples))
            reference_family.add_metric(key, 0.0 if report.state == NO_REFERENCE else 1.0)
        yield from (psi_family, alert_family, samples_family, reference_family, threshold_family)
