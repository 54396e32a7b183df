"""The console's "Model" page: the loaded model package and how its recent results compare with it.

Why here and not in the console: the console (``fhir_api``) may not import ``inference``, yet the
drift verdict needs the package's reference and inference/drift.py's arithmetic. So this module
computes, and :mod:`storage.model_health` carries the result as plain values the console renders;
the gateway hands the console a ``Callable[[], ModelHealth]`` closing over this function.

Drift over time is the current verdict repeated backwards: the newest ``points`` x
``monitoring.drift_window`` analysed results are cut into consecutive windows of ``drift_window``
(newest first, in :func:`storage.monitoring.recent_results`'s order, so the newest window is
exactly the one ``pneumo status`` and ``/metrics`` judge) and each is judged by
:func:`inference.drift.evaluate` against the same site reference. A window with fewer than
``drift_min_samples`` results (the oldest, partial one) is left out: its PSI would be noise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conf.settings import MonitoringSettings
from inference.drift import DriftReport, evaluate, manifest_reference
from inference.manifest import MANIFEST_FILE, ModelManifest
from storage.db import Database
from storage.model_health import (
    CurrentDrift,
    DatedSample,
    DriftPoint,
    FeaturePsi,
    ModelHealth,
    dated_results,
    probability_histogram,
    results_by_status,
)

#: The model card inference/training/export.py writes beside model.json.
MODEL_CARD_FILE = "MODEL_CARD.md"


def model_health(
    database: Database, manifest: ModelManifest, settings: MonitoringSettings, *, points: int = 12, bins: int = 20
) -> ModelHealth:
    """What the console shows about *manifest*'s model version, from the package and *database*.

    Four read-only queries in one session; the history reads at most ``points * drift_window``
    rows (probability, input statistics, label, time), the histogram and the counts none."""
    if points < 1:
        raise ValueError(f"points: need at least 1, got {points}")
    reference = manifest_reference(manifest, settings)
    with database.read_session() as session:
        samples = dated_results(session, manifest.id, manifest.version, points * settings.drift_window)
        histogram = probability_histogram(session, manifest.id, manifest.version, bins, threshold=manifest.threshold)
        statuses = results_by_status(session, manifest.id, manifest.version)
    windows = [samples[i:i + settings.drift_window] for i in range(0, len(samples), settings.drift_window)]
    current = evaluate(manifest.id, manifest.version, reference, windows[0] if windows else [], settings)
    history = [
        drift_point(window, evaluate(manifest.id, manifest.version, reference, window, settings), manifest.positive_label)
        for window in windows
        if len(window) >= settings.drift_min_samples
    ]
    return ModelHealth(
        model_id=manifest.id,
        version=manifest.version,
        name=manifest.name,
        manufacturer=manifest.manufacturer,
        intended_use=manifest.intended_use,
        threshold=manifest.threshold,
        manifest=package_json(manifest.model_dir),
        model_card=model_card(manifest.model_dir),
        drift_points=tuple(reversed(history)),
        probability_histogram=histogram,
        current_drift=current_drift(current),
        results_by_status=statuses,
    )


def drift_point(window: Sequence[DatedSample], report: DriftReport, positive_label: str) -> DriftPoint:
    """One history point from a non-empty window (newest first) and its drift report."""
    values = {f.feature: f.psi for f in report.features if f.psi is not None}
    labels = [s.label for s in window if s.label is not None]
    return DriftPoint(
        window_end=max(s.created_at for s in window),
        images=len(window),
        psi=values,
        max_psi=max(values.values()) if values else None,
        positive_rate=sum(1 for label in labels if label == positive_label) / len(labels) if labels else None,
        alert=report.alert,
    )


def current_drift(report: DriftReport) -> CurrentDrift:
    """inference/drift.py's report as the console's plain value."""
    return CurrentDrift(
        state=report.state,
        window=report.window,
        samples=report.samples,
        min_samples=report.min_samples,
        psi_alert=report.psi_alert,
        features=tuple(FeaturePsi(f.feature, f.samples, f.psi, f.alert) for f in report.features),
    )


def package_json(model_dir: Path) -> dict[str, Any]:
    """The package's ``model.json`` as written (it holds provenance, metrics and the drift
    reference, nothing secret); empty when it cannot be read (a manifest built in code)."""
    try:
        raw = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def model_card(model_dir: Path) -> str | None:
    """The package's model card (Markdown), None when it ships none."""
    try:
        return (model_dir / MODEL_CARD_FILE).read_text(encoding="utf-8")
    except OSError:
        return None

