"""The console's model page (inference/model_health.py) from the shipped model package and real
result rows: drift history by consecutive windows, the current verdict, the histogram, the counts."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from conf.settings import MonitoringSettings
from inference.drift import DRIFT, NO_REFERENCE, STABLE, TOO_FEW_SAMPLES, manifest_reference, model_drift
from inference.manifest import BUNDLED_MODEL_DIR, MANIFEST_FILE, ModelManifest, load_manifest
from inference.model_health import current_drift, model_health
from inference.reference import FeatureReference
from storage.db import Database
from storage.index import add_instance
from storage.metadata import extract_metadata
from storage.models import InferenceResult
from tests.inference import tiny_model

SETTINGS = MonitoringSettings(drift_window=100, drift_min_samples=50)
START = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)

Sample = tuple[float, dict[str, float]]


@pytest.fixture(scope="module")
def bundled() -> ModelManifest:
    return load_manifest(BUNDLED_MODEL_DIR)


def _like(reference: FeatureReference, n: int, seed: int) -> list[float]:
    """*n* values whose bin fractions are the reference's as nearly as *n* allows (bin middles, shuffled)."""
    edges = list(reference.edges)
    width = edges[-1] - edges[0] if len(edges) > 1 else 1.0
    bounds = [edges[0] - width / len(edges), *edges, edges[-1] + width / len(edges)]
    exact = np.asarray(reference.fractions) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(counts - exact)[: n - int(counts.sum())]:  # largest remainders first
        counts[i] += 1
    values = [(bounds[i] + bounds[i + 1]) / 2 for i, c in enumerate(counts) for _ in range(c)]
    return [float(v) for v in np.random.default_rng(seed).permutation(values)]


def _stable(manifest: ModelManifest, n: int, seed: int) -> list[Sample]:
    reference = manifest_reference(manifest, SETTINGS)
    assert reference is not None
    columns = {name: _like(ref, n, seed + i) for i, (name, ref) in enumerate(reference.items())}
    probabilities = columns.pop("probability")
    return [(p, {name: values[i] for name, values in columns.items()}) for i, p in enumerate(probabilities)]


def _shifted(n: int) -> list[Sample]:
    """Far brighter, flatter inputs, all called positive: what a changed export window looks like."""
    return [(0.95, {"mean": 0.9, "std": 0.05, "dark_fraction": 0.0, "bright_fraction": 0.5}) for _ in range(n)]


def _instance(session: Any) -> int:
    ds = Dataset()
    ds.PatientID, ds.PatientName = "PID-SECRET-1", "SECRET^NAME"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", generate_uid(), "CR"
    return int(add_instance(session, extract_metadata(ds), transfer_syntax_uid="1.2.840.10008.1.2.1", relative_path="x",
                            size=1, sha256="0" * 64, origin="received", calling_ae="T").id)


def _store(database: Database, manifest: ModelManifest, samples: list[Sample], start: dt.datetime,
           *, status: str = "ok", version: str | None = None) -> list[dt.datetime]:
    """Store *samples* one second apart from *start*, labelled as the analyser would; their times."""
    times = [start + dt.timedelta(seconds=i) for i in range(len(samples))]
    with database.session() as session:
        for (probability, stats), created in zip(samples, times, strict=True):
            analysed = status == "ok"
            label = manifest.positive_label if probability >= manifest.threshold else manifest.negative_label
            session.add(InferenceResult(
                instance_pk=_instance(session), model_id=manifest.id, model_version=version or manifest.version,
                status=status, probability=probability if analysed else None, label=label if analysed else None,
                threshold=manifest.threshold if analysed else None, input_stats=stats if analysed else None,
                created_at=created,
            ))
    return times


def _positive_rate(manifest: ModelManifest, samples: list[Sample]) -> float:
    return sum(1 for p, _ in samples if p >= manifest.threshold) / len(samples)


def test_history_cuts_consecutive_windows_and_the_newest_is_the_current_verdict(
    database: Database, bundled: ModelManifest
) -> None:
    partial, first, second, shifted = _stable(bundled, 30, 1), _stable(bundled, 100, 2), _stable(bundled, 100, 3), _shifted(100)
    _store(database, bundled, partial, START)
    first_times = _store(database, bundled, first, START + dt.timedelta(hours=1))
    second_times = _store(database, bundled, second, START + dt.timedelta(hours=2))
    shifted_times = _store(database, bundled, shifted, START + dt.timedelta(hours=3))
    _store(database, bundled, [(0.0, {})] * 3, START + dt.timedelta(hours=4), status="failed")
    _store(database, bundled, [(0.0, {})] * 2, START + dt.timedelta(hours=4), status="not-applicable")
    _store(database, bundled, _shifted(7), START + dt.timedelta(hours=5), version="0.9.0")  # another version: ignored

    health = model_health(database, bundled, SETTINGS)

    # The partial oldest window (30 < drift_min_samples) is left out; oldest first.
    assert [p.window_end for p in health.drift_points] == [first_times[-1], second_times[-1], shifted_times[-1]]
    assert [p.images for p in health.drift_points] == [100, 100, 100]
    assert [p.alert for p in health.drift_points] == [False, False, True]
    for point in health.drift_points[:2]:
        assert set(point.psi) == {"probability", "mean", "std", "dark_fraction", "bright_fraction"}
        assert point.max_psi == max(point.psi.values()) < SETTINGS.drift_psi_alert
    drifted = health.drift_points[-1]
    assert drifted.max_psi is not None and drifted.max_psi > 1.0 and drifted.psi["mean"] > SETTINGS.drift_psi_alert
    assert [p.positive_rate for p in health.drift_points] == pytest.approx(
        [_positive_rate(bundled, first), _positive_rate(bundled, second), 1.0])

    # The current verdict is the one pneumo status and /metrics give.
    assert health.current_drift == current_drift(model_drift(database, bundled, SETTINGS))
    assert health.current_drift.state == DRIFT and health.current_drift.alert
    assert (health.current_drift.window, health.current_drift.samples, health.current_drift.min_samples) == (100, 100, 50)
    assert {f.feature for f in health.current_drift.features if f.alert} >= {"mean", "std"}

    histogram = health.probability_histogram
    assert histogram.total == sum(histogram.counts) == 330
    assert histogram.threshold == bundled.threshold
    assert histogram.at_or_above_threshold == sum(1 for p, _ in partial + first + second + shifted if p >= bundled.threshold)
    assert histogram.counts[19] >= 100  # the shifted window's 0.95
    assert health.results_by_status == {"ok": 330, "failed": 3, "not-applicable": 2}

    # Fewer points read fewer windows: the newest ones.
    assert model_health(database, bundled, SETTINGS, points=2).drift_points == health.drift_points[1:]


def test_the_package_as_shipped_is_on_the_page(database: Database, bundled: ModelManifest) -> None:
    health = model_health(database, bundled, SETTINGS)
    assert (health.model_id, health.version, health.name) == (bundled.id, bundled.version, bundled.name)
    assert (health.manufacturer, health.intended_use, health.threshold) == (
        bundled.manufacturer, bundled.intended_use, bundled.threshold)
    assert health.manifest == json.loads((BUNDLED_MODEL_DIR / MANIFEST_FILE).read_text(encoding="utf-8"))
    assert health.manifest["onnx_sha256"] == bundled.onnx_sha256
    assert health.model_card is not None and "## Drift monitoring reference" in health.model_card


def test_an_empty_database_gives_an_empty_page_not_an_error(database: Database, bundled: ModelManifest) -> None:
    health = model_health(database, bundled, SETTINGS)
    assert health.drift_points == ()
    assert health.current_drift.state == TOO_FEW_SAMPLES and not health.current_drift.alert
    assert health.current_drift.samples == 0
    assert health.probability_histogram.total == 0 and health.probability_histogram.counts == (0,) * 20
    assert health.probability_histogram.threshold == bundled.threshold
    assert health.results_by_status == {}
    with pytest.raises(ValueError, match="points"):
        model_health(database, bundled, SETTINGS, points=0)


def test_a_stable_intake_is_stable(database: Database, bundled: ModelManifest) -> None:
    _store(database, bundled, _stable(bundled, 100, 7), START)
    health = model_health(database, bundled, SETTINGS)
    assert health.current_drift.state == STABLE
    assert len(health.drift_points) == 1 and not health.drift_points[0].alert


def test_a_package_without_reference_or_card_still_shows_its_results(database: Database, tmp_path: Any) -> None:
    manifest = load_manifest(tiny_model.write_model_dir(tmp_path / "tiny"))
    assert manifest.drift_reference is None
    samples: list[Sample] = [(0.2, {}), (0.9, {})] * 30
    _store(database, manifest, samples, START)
    health = model_health(database, manifest, SETTINGS, bins=10)
    assert health.model_card is None
    assert health.manifest == json.loads((manifest.model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    assert health.current_drift.state == NO_REFERENCE and health.current_drift.features == ()
    (point,) = health.drift_points
    assert (point.images, dict(point.psi), point.max_psi, point.alert) == (60, {}, None, False)
    assert point.positive_rate == pytest.approx(_positive_rate(manifest, samples))
    assert len(health.probability_histogram.counts) == 10 and health.probability_histogram.total == 60
