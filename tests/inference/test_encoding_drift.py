"""Encoding drift tool: every encoding carries the same picture, and the gateway presents the
windowed and the display-ready ones identically (so the model cannot tell them apart)."""

from __future__ import annotations

import numpy as np
import pytest

from inference.manifest import PreprocessingSpec
from inference.preprocess import preprocess
from inference.training.encoding_drift import ENCODINGS, pairwise_drift

SPEC = PreprocessingSpec(width=224, height=224)


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (224, 224), dtype=np.uint8)
    image[:, :3] = 0  # both end points present
    image[:, -3:] = 255
    return image


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_every_encoding_carries_the_same_picture(picture: np.ndarray, name: str) -> None:
    ds = ENCODINGS[name](picture, 0)
    top = (1 << int(ds.BitsStored)) - 1
    back = np.rint(ds.pixel_array.astype(np.float64) * 255 / top).astype(np.uint8)
    assert np.array_equal(back, picture)


def test_windowed_and_display_ready_encodings_are_presented_identically(picture: np.ndarray) -> None:
    names = ("8bit_window", "8bit_no_window", "16bit_window")
    tensors = {name: preprocess(ENCODINGS[name](picture, 0), SPEC).tensor for name in names}
    np.testing.assert_allclose(tensors["8bit_no_window"], tensors["8bit_window"], atol=1e-6)
    np.testing.assert_allclose(tensors["16bit_window"], tensors["8bit_window"], atol=1e-4)


def test_deeper_encodings_without_a_window_agree_with_each_other(picture: np.ndarray) -> None:
    t12 = preprocess(ENCODINGS["12bit_no_window"](picture, 0), SPEC)
    t16 = preprocess(ENCODINGS["16bit_no_window"](picture, 0), SPEC)
    assert t12.window_source == t16.window_source == "percentile"
    np.testing.assert_allclose(t12.tensor, t16.tensor, atol=2e-3)


def test_pairwise_drift_is_mean_and_max_of_absolute_differences() -> None:
    rows = pairwise_drift({"a": np.array([0.1, 0.5]), "b": np.array([0.2, 0.1]), "c": np.array([0.1, 0.5])})
    by_pair = {(r["a"], r["b"]): (r["mean_abs"], r["max_abs"]) for r in rows}
    assert by_pair[("a", "b")] == pytest.approx((0.25, 0.4))
    assert by_pair[("a", "c")] == (0.0, 0.0)
    assert len(rows) == 3
