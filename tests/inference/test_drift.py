"""Drift monitoring: PSI (tables), the reference in the model package, its computation on real
radiographs, the Prometheus collector, and the alert end to end through the real analyser."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from conf.settings import MonitoringSettings
from inference.analyser import ClassifierAnalyser
from inference.drift import (
    DRIFT,
    EPSILON,
    NO_REFERENCE,
    STABLE,
    TOO_FEW_SAMPLES,
    DriftCollector,
    bin_fractions,
    evaluate,
    feature_psi,
    model_drift,
    psi,
    site_reference,
)
from inference.errors import ModelPackageError
from inference.example_dicom import load_grayscale, wrap_radiograph
from inference.input_stats import INPUT_FEATURES, input_statistics
from inference.manifest import BUNDLED_MODEL_DIR, ModelManifest, load_manifest
from inference.preprocess import preprocess
from inference.reference import FeatureReference
from inference.training.data import deduplicate, patient_split, read_manifest
from inference.training.evaluation import open_engine, validation_set
from inference.training.monitoring import (
    PROBABILITY_EDGES,
    distribution,
    measure,
    quantile_edges,
    reference_block,
    reference_features,
    write_reference,
)
from storage.db import Database
from storage.index import add_instance
from storage.metadata import extract_metadata
from storage.migrate import upgrade
from storage.models import InferenceResult
from storage.monitoring import WindowSample
from storage.results import verdict_record
from tests.inference import tiny_model
from tests.inference.kermany_data import DATA_ROOT, needs_data

FEATURES = ("probability", *INPUT_FEATURES)
SETTINGS = MonitoringSettings(drift_window=500, drift_min_samples=100, drift_psi_alert=0.25)

# --------------------------------------------------------------------------- PSI tables

UNIFORM10 = [0.1] * 10
PSI_CASES: list[tuple[str, list[float], list[float], float]] = [
    ("identical", [0.2, 0.3, 0.5], [0.2, 0.3, 0.5], 0.0),
    ("identical uniform", UNIFORM10, UNIFORM10, 0.0),
    # (0.6-0.5) ln(0.6/0.5) + (0.4-0.5) ln(0.4/0.5)
    ("small shift", [0.5, 0.5], [0.6, 0.4], 0.1 * math.log(1.2) - 0.1 * math.log(0.8)),
    # an empty reference bin counts as EPSILON, not as an infinite PSI
    ("empty reference bin", [0.5, 0.5, 0.0], [0.5, 0.4, 0.1],
     (0.1 - EPSILON) * math.log(0.1 / EPSILON) - 0.1 * math.log(0.8)),
    # an empty window bin likewise
    ("empty window bin", [0.5, 0.4, 0.1], [0.5, 0.5, 0.0],
     0.1 * math.log(0.5 / 0.4) + (EPSILON - 0.1) * math.log(EPSILON / 0.1)),
    ("both empty", [0.5, 0.5, 0.0], [0.5, 0.5, 0.0], 0.0),
]


@pytest.mark.parametrize(("case", "expected", "actual", "value"), PSI_CASES, ids=[c[0] for c in PSI_CASES])
def test_psi_table(case: str, expected: list[float], actual: list[float], value: float) -> None:
    assert psi(expected, actual) == pytest.approx(value, abs=1e-12)


def test_psi_is_large_for_a_shifted_distribution_and_symmetric_in_its_terms() -> None:
    shifted = [0.0] * 5 + [0.2] * 5  # all mass moved to the upper half
    value = psi(UNIFORM10, shifted)
    assert value > 0.25 * 10  # far beyond "significant"
    assert psi(shifted, UNIFORM10) == pytest.approx(value)  # (a-e) ln(a/e) is symmetric
    assert 0.1 < psi([0.25] * 4, [0.4, 0.25, 0.25, 0.1]) < 0.25  # a moderate shift


@pytest.mark.parametrize(("expected", "actual"), [([0.5, 0.5], [1.0]), ([], []), ([[0.5, 0.5]], [[0.5, 0.5]])])
def test_psi_refuses_unmatched_bins(expected: Any, actual: Any) -> None:
    with pytest.raises(ValueError, match="expected/actual"):
        psi(expected, actual)


BIN_CASES: list[tuple[list[float], list[float], list[float]]] = [
    ([0.5], [0.2, 0.5, 0.7], [1 / 3, 2 / 3]),  # an edge value belongs to the bin above it
    ([0.1, 0.2], [-5.0, 0.15, 99.0, 0.1], [0.25, 0.5, 0.25]),  # open ends
    ([], [0.3, 0.4], [1.0]),  # no edges: one bin
]


@pytest.mark.parametrize(("edges", "values", "fractions"), BIN_CASES)
def test_bin_fractions(edges: list[float], values: list[float], fractions: list[float]) -> None:
    assert bin_fractions(values, edges).tolist() == pytest.approx(fractions)


def test_bin_fractions_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        bin_fractions([], [0.5])


# --------------------------------------------------------------------------- evaluation


def _reference(rng: np.random.Generator, n: int = 5000) -> dict[str, FeatureReference]:
    """A reference built like the real one, from synthetic draws."""
    raw = rng.beta(0.5, 0.5, n)
    stats = [{"mean": m, "std": s, "dark_fraction": d, "bright_fraction": b}
             for m, s, d, b in zip(rng.normal(0.47, 0.05, n), rng.normal(0.22, 0.03, n), rng.uniform(0, 0.2, n),
                                   rng.exponential(1e-4, n), strict=True)]
    return reference_features(raw, stats)


def _samples(rng: np.random.Generator, n: int, *, mean_shift: float = 0.0) -> list[WindowSample]:
    return [WindowSample(float(p), {"mean": float(m) + mean_shift, "std": float(s), "dark_fraction": float(d),
                                    "bright_fraction": float(b)})
            for p, m, s, d, b in zip(rng.beta(0.5, 0.5, n), rng.normal(0.47, 0.05, n), rng.normal(0.22, 0.03, n),
                                     rng.uniform(0, 0.2, n), rng.exponential(1e-4, n), strict=True)]


def test_same_distribution_is_stable_and_a_shifted_mean_raises_the_alert() -> None:
    rng = np.random.default_rng(7)
    reference = _reference(rng)
    same = evaluate("m", "1", reference, _samples(rng, 500), SETTINGS)
    assert same.state == STABLE and not same.alert and same.samples == 500
    assert [f.feature for f in same.features] == list(FEATURES)
    assert all(f.psi is not None and f.psi < 0.1 for f in same.features), same.features
    shifted = evaluate("m", "1", reference, _samples(rng, 500, mean_shift=0.1), SETTINGS)
    assert shifted.state == DRIFT and shifted.alert
    by_feature = {f.feature: f for f in shifted.features}
    assert by_feature["mean"].alert and by_feature["mean"].psi is not None and by_feature["mean"].psi > 0.25
    assert not by_feature["std"].alert and not by_feature["probability"].alert


def test_too_few_samples_give_no_verdict_and_the_window_is_bounded() -> None:
    rng = np.random.default_rng(8)
    reference = _reference(rng)
    few = evaluate("m", "1", reference, _samples(rng, 99, mean_shift=0.3), SETTINGS)
    assert few.state == TOO_FEW_SAMPLES and not few.alert
    assert all(f.psi is None and f.samples == 99 for f in few.features)
    # Only the newest drift_window samples count: 500 in-distribution ones hide 300 older shifted ones.
    window = evaluate("m", "1", reference, _samples(rng, 500) + _samples(rng, 300, mean_shift=0.3), SETTINGS)
    assert window.samples == 500 and window.state == STABLE


def test_results_without_statistics_count_for_the_probability_only() -> None:
    rng = np.random.default_rng(9)
    reference = _reference(rng)
    older = [WindowSample(s.probability) for s in _samples(rng, 400)]  # made before migration 0013
    report = evaluate("m", "1", reference, _samples(rng, 100) + older, SETTINGS)
    by_feature = {f.feature: f for f in report.features}
    assert by_feature["probability"].samples == 500 and by_feature["mean"].samples == 100
    assert report.state == STABLE
    report = evaluate("m", "1", reference, _samples(rng, 99) + older, SETTINGS)
    assert {f.feature for f in report.features if f.psi is None} == set(INPUT_FEATURES)
    assert report.state == STABLE  # the probability still gives a verdict


def test_no_reference_is_reported_as_such() -> None:
    report = evaluate("m", "1", None, _samples(np.random.default_rng(1), 200), SETTINGS)
    assert report.state == NO_REFERENCE and not report.alert and report.features == []
    assert report.to_json()["state"] == "no reference"


# --------------------------------------------------------------------------- the reference


def test_feature_reference_validates_itself() -> None:
    with pytest.raises(ValueError, match="edges \\+ 1"):
        FeatureReference((0.5,), (1.0,))
    with pytest.raises(ValueError, match="strictly increasing"):
        FeatureReference((0.5, 0.5), (0.2, 0.3, 0.5))
    with pytest.raises(ValueError, match="sum to"):
        FeatureReference((0.5,), (0.2, 0.3))
    with pytest.raises(ValueError, match="by_label.A"):
        FeatureReference((0.5,), (0.5, 0.5), {"A": (1.0,)})


def test_prevalence_mixes_the_per_label_fractions_and_calibration_maps_the_edges() -> None:
    ref = FeatureReference((0.5,), (0.3, 0.7), {"NORMAL": (0.9, 0.1), "PNEUMONIA": (0.1, 0.9)})
    assert ref.at_prevalence("PNEUMONIA", "NORMAL", 0.25).fractions == pytest.approx((0.7, 0.3))
    assert ref.at_prevalence("PNEUMONIA", "NORMAL", 0.0).fractions == pytest.approx((0.9, 0.1))
    with pytest.raises(ValueError, match="by_label"):
        FeatureReference((0.5,), (0.3, 0.7)).at_prevalence("PNEUMONIA", "NORMAL", 0.5)
    assert ref.mapped(lambda x: x / 2).edges == (0.25,)


def test_quantile_edges_collapse_on_a_statistic_that_is_mostly_zero() -> None:
    values = [0.0] * 80 + [1e-4] * 10 + [5e-4] * 10
    edges = quantile_edges(values)
    assert edges == (0.0, 2e-05, 0.00014)  # zero gets a bin of its own, not eight empty ones (linear quantiles)
    ref = distribution(values, edges)
    assert ref.fractions == pytest.approx((0.0, 0.8, 0.1, 0.1))
    assert feature_psi(ref, values) == pytest.approx(0.0, abs=1e-9)
    assert feature_psi(ref, [0.0] * 50 + [1.0] * 50) > 0.25  # half the images now saturated


def _tiny_package(tmp_path: Path, **overrides: Any) -> Path:
    return tiny_model.write_model_dir(tmp_path / "tiny", **overrides)


def _images(seed: int, n: int, brightness: float) -> list[npt.NDArray[np.uint8]]:
    """Textured 256x256 8-bit images around *brightness* (0-1)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 1, 256)[None, :] * np.linspace(0.6, 1, 256)[:, None]
    return [np.clip(255 * (brightness * base + rng.normal(0, 0.08, (256, 256)) + 0.2), 0, 255).astype(np.uint8)
            for _ in range(n)]


def test_reference_block_is_measured_through_the_runtime_and_round_trips_through_the_package(tmp_path: Path) -> None:
    package = _tiny_package(tmp_path)
    manifest = load_manifest(package)
    assert manifest.drift_reference is None  # an older package: tolerated
    images = _images(1, 30, 0.5)
    labels = ["NORMAL"] * 10 + ["PNEUMONIA"] * 20
    block = reference_block(manifest, images, "30 synthetic images", labels=labels, threads=1)
    assert block["n"] == 30 and block["n_by_label"] == {"NORMAL": 10, "PNEUMONIA": 20}
    assert block["onnx_sha256"] == manifest.onnx_sha256 and block["probability_scale"] == "raw"
    assert set(block["features"]) == set(FEATURES)
    assert block["features"]["probability"]["edges"] == list(PROBABILITY_EDGES)
    write_reference(package, block)
    loaded = load_manifest(package)
    assert loaded.drift_reference is not None and loaded.drift_reference.n == 30
    # The same images as the window: no drift at all (same pipeline, same bins).
    with open_engine(loaded, 1) as engine:
        predictions = [engine.predict(input_tensor(loaded, img)) for img in images]
    samples = [WindowSample(round(p.probability, 4), input_statistics(input_tensor(loaded, img)))
               for p, img in zip(predictions, images, strict=True)]
    features = site_reference(loaded.drift_reference, loaded.calibration.apply)
    report = evaluate(loaded.id, loaded.version, features, samples, MonitoringSettings(drift_window=30, drift_min_samples=30))
    assert report.state == STABLE and all(f.psi is not None and f.psi < 1e-3 for f in report.features), report
    # Brighter images: the tiny model's probability and the input mean move; the alert is raised.
    bright = _images(2, 30, 0.9)
    with open_engine(loaded, 1) as engine:
        shifted = [WindowSample(round(engine.predict(input_tensor(loaded, img)).probability, 4),
                                input_statistics(input_tensor(loaded, img))) for img in bright]
    report = evaluate(loaded.id, loaded.version, features, shifted, MonitoringSettings(drift_window=30, drift_min_samples=30))
    alerts = {f.feature for f in report.features if f.alert}
    assert report.state == DRIFT and {"probability", "mean"} <= alerts, report


def input_tensor(manifest: ModelManifest, pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The model input the worker would make of *pixels* wrapped as a CR image."""
    return preprocess(wrap_radiograph(pixels), manifest.preprocessing).tensor



@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(onnx_sha256="0" * 64), "measured on another network"),
        (lambda r: r["features"]["mean"].update(fractions=[0.5, 0.6]), "features.mean"),
        (lambda r: r["features"]["mean"].update(edges="x"), "features.mean.edges"),
        (lambda r: r.update(n=0), "reference.n"),
        (lambda r: r.update(probability_scale="logit"), "probability_scale"),
        (lambda r: r.update(features={}), "reference.features"),
    ],
)
def test_a_malformed_or_foreign_reference_refuses_the_package(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    data = tiny_model.build_onnx()
    reference: dict[str, Any] = {
        "onnx_sha256": hashlib.sha256(data).hexdigest(), "probability_scale": "raw", "n": 10,
        "features": {"probability": {"edges": [0.5], "fractions": [0.4, 0.6]},
                     "mean": {"edges": [0.5], "fractions": [0.5, 0.5]}},
    }
    ok = _tiny_package(tmp_path, monitoring={"reference": json.loads(json.dumps(reference))})
    assert load_manifest(ok).drift_reference is not None
    change(reference)
    bad = tiny_model.write_model_dir(tmp_path / "bad", monitoring={"reference": reference})
    with pytest.raises(ModelPackageError, match=message):
        load_manifest(bad)


def test_the_bundled_model_carries_its_reference() -> None:
    manifest = load_manifest(BUNDLED_MODEL_DIR)
    reference = manifest.drift_reference
    assert reference is not None and reference.onnx_sha256 == manifest.onnx_sha256
    assert reference.n == manifest.metrics["n"] == 780  # the whole validation split
    assert set(reference.features) == set(FEATURES)
    for ref in reference.features.values():
        assert set(ref.by_label) == {"NORMAL", "PNEUMONIA"}


@needs_data
def test_reference_measures_real_radiographs_as_the_runtime_does(bundled_analyser: ClassifierAnalyser) -> None:
    """A handful of real validation radiographs: what the reference computation measures per image
    (raw probability, input statistics) is what the worker's analyser reports for the same image —
    so the window and the reference are comparable — and the block is well formed."""
    manifest = load_manifest(BUNDLED_MODEL_DIR)
    val = validation_set(manifest, DATA_ROOT, limit=12, seed=3)
    images = [load_grayscale(DATA_ROOT / r.path) for r in val.records]
    labels = [manifest.labels[r.label_id] for r in val.records]
    with open_engine(manifest, 2) as engine:
        raw, stats = measure(engine, images)
    for pixels, p, st in zip(images, raw, stats, strict=True):
        verdict = bundled_analyser.analyse(wrap_radiograph(pixels), with_display=False).verdict
        assert verdict.input_stats == st
        assert verdict.probability == pytest.approx(manifest.calibration.apply(float(p)), abs=1e-6)
    block = reference_block(manifest, images, val.description, labels=labels, threads=2)
    assert block["n"] == len(images) >= 12 and sum(block["n_by_label"].values()) == len(images)
    for name in FEATURES:
        assert sum(block["features"][name]["fractions"]) == pytest.approx(1.0, abs=1e-5)
        for fractions in block["features"][name]["by_label"].values():
            assert sum(fractions) == pytest.approx(1.0, abs=1e-5)


@needs_data
@pytest.mark.slow
def test_the_bundled_reference_is_what_the_code_computes() -> None:
    """Re-running the reference computation on the whole validation split (about 12 s on 2 CPU
    threads) reproduces model.json's ``monitoring.reference`` bin for bin."""
    manifest = load_manifest(BUNDLED_MODEL_DIR)
    bundled = manifest.drift_reference
    assert bundled is not None
    val = validation_set(manifest, DATA_ROOT)
    images = [load_grayscale(DATA_ROOT / r.path) for r in val.records]
    block = reference_block(manifest, images, val.description, labels=[manifest.labels[r.label_id] for r in val.records])
    for name, ref in bundled.features.items():
        again = block["features"][name]
        assert again["edges"] == list(ref.edges), name
        assert again["fractions"] == pytest.approx(list(ref.fractions), abs=1e-6), name
        assert again["by_label"] == {k: pytest.approx(list(v), abs=1e-6) for k, v in ref.by_label.items()}, name


# --------------------------------------------------------------------------- storage + collector


def _instance(session: Any) -> int:
    ds = Dataset()
    ds.PatientID, ds.PatientName = "PID-SECRET-1", "SECRET^NAME"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1", generate_uid(), "CR"
    return int(add_instance(session, extract_metadata(ds), transfer_syntax_uid="1.2.840.10008.1.2.1", relative_path="x",
                            size=1, sha256="0" * 64, origin="received", calling_ae="T").id)


def _store(database: Database, manifest: ModelManifest, samples: list[WindowSample], start: dt.datetime) -> None:
    with database.session() as session:
        for i, sample in enumerate(samples):
            session.add(InferenceResult(
                instance_pk=_instance(session), model_id=manifest.id, model_version=manifest.version, status="ok",
                probability=sample.probability, label="NORMAL", input_stats=sample.input_stats or None,
                created_at=start + dt.timedelta(seconds=i),
            ))


def _tiny_with_reference(tmp_path: Path) -> ModelManifest:
    package = _tiny_package(tmp_path)
    block = reference_block(load_manifest(package), _images(1, 40, 0.5), "synthetic", threads=1)
    write_reference(package, block)
    return load_manifest(package)


def _metrics(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in registry.collect():
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_collector_exposes_psi_alert_and_window_at_scrape_time(database: Database, tmp_path: Path) -> None:
    manifest = _tiny_with_reference(tmp_path)
    settings = MonitoringSettings(drift_window=40, drift_min_samples=40)
    registry = CollectorRegistry()
    registry.register(DriftCollector(database, manifest, settings))
    key = (("model", manifest.id), ("version", manifest.version))
    empty = _metrics(registry)
    assert empty[("pneumo_model_drift_window_samples", key)] == 0
    assert empty[("pneumo_model_drift_alert", tuple(sorted((*key, ("feature", "any")))))] == 0
    assert not any(name == "pneumo_model_drift_psi" for name, _ in empty)  # no verdict yet
    assert empty[("pneumo_model_drift_reference", key)] == 1
    assert empty[("pneumo_model_drift_threshold", ())] == 0.25

    def window(images: list[npt.NDArray[np.uint8]]) -> list[WindowSample]:
        with open_engine(manifest, 1) as engine:
            return [WindowSample(round(engine.predict(input_tensor(manifest, img)).probability, 4),
                                 input_statistics(input_tensor(manifest, img))) for img in images]

    start = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)
    _store(database, manifest, window(_images(1, 40, 0.5)), start)
    stable = _metrics(registry)
    assert stable[("pneumo_model_drift_window_samples", key)] == 40
    for feature in FEATURES:
        labels = tuple(sorted((*key, ("feature", feature))))
        assert stable[("pneumo_model_drift_psi", labels)] < 1e-3
        assert stable[("pneumo_model_drift_alert", labels)] == 0
    _store(database, manifest, window(_images(2, 40, 0.9)), start + dt.timedelta(hours=1))
    drifted = _metrics(registry)
    assert drifted[("pneumo_model_drift_alert", tuple(sorted((*key, ("feature", "any")))))] == 1
    assert drifted[("pneumo_model_drift_psi", tuple(sorted((*key, ("feature", "mean")))))] > 0.25
    text = generate_latest(registry).decode()
    assert 'pneumo_model_drift_alert{feature="any"' in text
    for secret in ("PID-SECRET-1", "SECRET", "1.2.826"):
        assert secret not in text


def test_collector_without_reference_says_so(database: Database, tmp_path: Path) -> None:
    manifest = load_manifest(_tiny_package(tmp_path))
    registry = CollectorRegistry()
    registry.register(DriftCollector(database, manifest, SETTINGS))
    found = _metrics(registry)
    assert found[(("pneumo_model_drift_reference"), (("model", manifest.id), ("version", manifest.version)))] == 0
    assert model_drift(database, manifest, SETTINGS).state == NO_REFERENCE


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bundled_analyser() -> Iterator[ClassifierAnalyser]:
    manifest = load_manifest(BUNDLED_MODEL_DIR)
    with open_engine(manifest, 2) as engine:
        yield ClassifierAnalyser(engine)


def _training_images(n: int, seed: int) -> list[npt.NDArray[np.uint8]]:
    """*n* real radiographs from the training part of the split (not the reference's images)."""
    records, _ = deduplicate(read_manifest(DATA_ROOT))
    train = patient_split(records, 0.15, 20260317).train
    picks = np.random.default_rng(seed).choice(len(train), n, replace=False)
    return [load_grayscale(DATA_ROOT / train[int(i)].path) for i in sorted(picks)]


@needs_data
def test_shifted_radiographs_through_the_real_analyser_raise_the_alert_and_normal_ones_do_not(
    bundled_analyser: ClassifierAnalyser, tmp_path: Path
) -> None:
    database = Database(f"sqlite:///{tmp_path / 'drift.db'}")
    upgrade(database)
    manifest = load_manifest(BUNDLED_MODEL_DIR)
    settings = MonitoringSettings(drift_window=150, drift_min_samples=150)
    images = _training_images(150, seed=11)

    def analyse_and_store(pixels: list[npt.NDArray[np.uint8]], start: dt.datetime) -> None:
        with database.session() as session:
            for i, p in enumerate(pixels):
                verdict = bundled_analyser.analyse(wrap_radiograph(p), with_display=False).verdict
                assert verdict.input_stats is not None and set(verdict.input_stats) == set(INPUT_FEATURES)
                session.add(InferenceResult(instance_pk=_instance(session), model_id=manifest.id,
                                            model_version=manifest.version, created_at=start + dt.timedelta(seconds=i),
                                            **verdict_record(verdict)))

    try:
        analyse_and_store(images, dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC))
        normal = model_drift(database, manifest, settings)
        assert normal.state == STABLE, normal
        assert all(f.psi is not None and f.psi < 0.25 for f in normal.features), normal
        # The same radiographs exported too dark (x0.6): every image is still "valid", nothing fails,
        # but the model sees inputs it never saw in training.
        darker = [(p * 0.6).astype(np.uint8) for p in images]
        analyse_and_store(darker, dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC))
        dark = model_drift(database, manifest, settings)
        assert dark.state == DRIFT, dark
        assert {"mean", "std"} <= {f.feature for f in dark.features if f.alert}
        # Inverted (a MONOCHROME1 image shown the wrong way round).
        analyse_and_store([255 - p for p in images], dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC))
        inverted = model_drift(database, manifest, settings)
        assert inverted.state == DRIFT and {"dark_fraction", "bright_fraction"} <= {
            f.feature for f in inverted.features if f.alert}
    finally:
        database.dispose()
