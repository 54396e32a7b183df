"""Temperature scaling: the pure functions, the manifest object, and the engine applying it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from inference.calibration import (
    Calibration,
    apply_temperature,
    brier,
    expected_calibration_error,
    fit_temperature,
    logit,
    nll,
    sigmoid,
)
from inference.engine import EngineOptions, InferenceEngine
from inference.errors import ModelPackageError
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from tests.inference.tiny_model import expected, write_model_dir


@pytest.mark.parametrize(
    ("p", "t", "out"),
    [
        (0.5, 2.0, 0.5),  # the midpoint is fixed
        (0.9, 1.0, 0.9),  # T = 1 is the identity
        (0.9, 2.0, 0.75),  # logit(0.9) = ln 9; sigmoid(ln 9 / 2) = 3 / 4
        (0.1, 2.0, 0.25),
        (0.75, 0.5, 0.9),  # T < 1 sharpens
        (1.0, 2.0, 1.0 / (1.0 + math.sqrt(1e-7 / (1 - 1e-7)))),  # saturated float32 output is clipped
    ],
)
def test_apply_temperature(p: float, t: float, out: float) -> None:
    assert apply_temperature(p, t) == pytest.approx(out, rel=1e-9)


def test_logit_sigmoid_round_trip_and_no_overflow() -> None:
    p = np.array([1e-6, 0.2, 0.5, 0.8, 1 - 1e-6])
    assert np.allclose(sigmoid(logit(p)), p)
    assert sigmoid(np.array([-1000.0, 1000.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("labels", "probs", "ece"),
    [
        ([1, 0], [1.0, 0.0], 0.0),
        ([1, 1, 0, 0], [0.8, 0.8, 0.8, 0.8], 0.3),  # one bin: |0.5 - 0.8|
        ([1, 0, 1, 0], [0.95, 0.05, 0.55, 0.55], 0.5 * 0.05 + 0.5 * 0.05),  # bins 10, 1 and 6
        ([0], [0.0], 0.0),  # probability 0 falls in the first bin
    ],
)
def test_expected_calibration_error(labels: list[int], probs: list[float], ece: float) -> None:
    assert expected_calibration_error(labels, probs) == pytest.approx(ece)


def test_brier_and_nll() -> None:
    assert brier([1, 0], [0.8, 0.4]) == pytest.approx((0.04 + 0.16) / 2)
    assert nll([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_recovers_a_known_temperature(true_t: float) -> None:
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 3.0, 20000)  # calibrated logits
    labels = rng.random(z.size) < sigmoid(z)
    overconfident = sigmoid(z * true_t)  # what a model with temperature true_t would output
    fitted = fit_temperature(labels.astype(int), overconfident)
    assert fitted == pytest.approx(true_t, rel=0.05)
    after = sigmoid(logit(overconfident) / fitted)
    assert nll(labels, after) <= nll(labels, overconfident) + 1e-12


def test_fit_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit_temperature([1, 1], [0.6, 0.7])


@pytest.mark.parametrize("t", [0.0, -1.0, 21.0, float("nan")])
def test_calibration_rejects_absurd_temperatures(t: float) -> None:
    with pytest.raises(ValueError):
        Calibration(temperature=t)


def test_manifest_calibration_is_validated(tmp_path: Path) -> None:
    for bad, fragment in (({"method": "platt", "temperature": 1.2}, "method"), ({"temperature": "1.2"}, "temperature")):
        directory = write_model_dir(tmp_path / f"m{len(fragment)}{bad.get('method', '')}", calibration=bad)
        with pytest.raises(ModelPackageError, match=fragment):
            load_manifest(directory)


def test_bundled_model_ships_a_temperature_and_a_consistent_threshold() -> None:
    manifest = load_manifest(BUNDLED_MODEL_DIR)
    raw = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())
    assert manifest.calibration.method == "temperature" and manifest.calibration.temperature > 1.0
    assert "optimistic" in manifest.calibration.fitted_on
    assert manifest.raw_threshold == raw["threshold"]
    assert manifest.threshold == pytest.approx(apply_temperature(raw["threshold"], manifest.calibration.temperature))
    assert manifest.threshold == pytest.approx(raw["calibration"]["threshold_calibrated"], abs=1e-6)


def test_engine_reports_calibrated_probability_and_decides_on_the_raw_one(tmp_path: Path) -> None:
    # tiny model: p = sigmoid(8 * (mean - 0.5)); raw threshold 0.5 is mean 0.5.
    model = write_model_dir(tmp_path / "model", threshold=0.6, calibration={"method": "temperature", "temperature": 2.0})
    manifest = load_manifest(model)
    assert manifest.threshold == pytest.approx(apply_temperature(0.6, 2.0))
    with InferenceEngine(manifest, EngineOptions(max_batch=1, allow_cuda=False)) as engine:
        for level in (0.40, 0.545, 0.556, 0.70):  # raw p ~ 0.31, 0.589 and 0.610 (either side of 0.6), 0.83
            tensor = np.full((224, 224), level, dtype=np.float32)
            raw, _cam = expected(tensor)
            prediction = engine.predict(tensor)
            assert prediction.raw_probability == pytest.approx(raw, abs=1e-4)
            assert prediction.probability == pytest.approx(apply_temperature(prediction.raw_probability, 2.0), abs=1e-9)
            assert prediction.threshold == manifest.threshold
            assert prediction.label == ("PNEUMONIA" if raw >= 0.6 else "NORMAL")
            # the calibrated pair gives the same decision
            assert (prediction.probability >= prediction.threshold) == (prediction.label == "PNEUMONIA")
