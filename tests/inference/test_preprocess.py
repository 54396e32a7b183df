"""Preprocessing: hand-computed tables for each stage, real samples in every transfer syntax."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from inference.errors import CorruptPixelDataError, MissingPixelDataError, UnsupportedImageError
from inference.manifest import PreprocessingSpec
from inference.preprocess import (
    Window,
    apply_limits,
    apply_window,
    block_mean,
    decode_j2k_reduced,
    display_image,
    j2k_reduce_level,
    limits_for_targets,
    modality_values,
    percentile_window,
    preprocess,
    reduction_factor,
    resize_squash,
    to_monochrome2,
)

SPEC = PreprocessingSpec(width=224, height=224)


# --------------------------------------------------------------------------- pure stages


@pytest.mark.parametrize(
    ("window", "x", "y"),
    [
        # LINEAR (C.11.2.1.2.1) with c=50.5, w=101: y = x / 100 on [0, 100]
        (Window(50.5, 101), [-10, 0, 25, 100, 150], [0, 0, 0.25, 1, 1]),
        # LINEAR_EXACT (C.11.2.1.3.2) with c=50, w=100: y = x / 100
        (Window(50, 100, "LINEAR_EXACT"), [-1, 0, 50, 75, 100, 101], [0, 0, 0.5, 0.75, 1, 1]),
        # SIGMOID (C.11.2.1.3.1): 1 / (1 + exp(-4 (x - c) / w))
        (Window(50, 100, "SIGMOID"), [50, 75], [0.5, 1 / (1 + np.exp(-1.0))]),
        # LINEAR with w = 1 is a step at c - 0.5
        (Window(10, 1), [9, 9.5, 10], [0, 0, 1]),
    ],
)
def test_apply_window(window: Window, x: list[float], y: list[float]) -> None:
    out = apply_window(np.array(x, dtype=np.float32), window)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, y, atol=1e-6)


def test_apply_limits_and_flat_image() -> None:
    np.testing.assert_allclose(apply_limits(np.array([5, 10, 15, 20, 25]), 10, 20), [0, 0, 0.5, 1, 1])
    assert not apply_limits(np.full(4, 7.0), 7, 7).any()


def test_monochrome1_is_inverted() -> None:
    x = np.array([0, 0.25, 1], dtype=np.float32)
    np.testing.assert_allclose(to_monochrome2(x, "MONOCHROME1"), [1, 0.75, 0])
    np.testing.assert_allclose(to_monochrome2(x, "MONOCHROME2"), x)


def test_modality_rescale() -> None:
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    np.testing.assert_allclose(modality_values(np.array([0, 50, 100]), ds), [-100, 0, 100])
    assert modality_values(np.array([3]), Dataset())[0] == 3


def test_block_mean_partial_blocks() -> None:
    arr = np.arange(25, dtype=np.uint16).reshape(5, 5)
    expected = [[3, 5, 6.5], [13, 15, 16.5], [20.5, 22.5, 24]]
    np.testing.assert_allclose(block_mean(arr, 2), expected)
    np.testing.assert_allclose(block_mean(arr, 1), arr)


def test_reduction_planning() -> None:
    assert reduction_factor((1955, 1841), (448, 448)) == 4
    assert reduction_factor((224, 224), (448, 448)) == 1
    assert j2k_reduce_level((1955, 1841), (448, 448), levels=5) == 2
    assert j2k_reduce_level((1955, 1841), (448, 448), levels=1) == 1


@pytest.mark.parametrize(
    ("limits", "targets", "expected"),
    [
        ((100.0, 900.0), (0.0, 0.8), (100.0, 1100.0)),  # 900 lands at 0.8, 1100 is white
        ((100.0, 900.0), (0.1, 0.9), (0.0, 1000.0)),
        ((100.0, 900.0), (0.0, 1.0), (100.0, 900.0)),  # the plain percentile window
        ((5.0, 5.0), (0.0, 0.8), (5.0, 5.0)),  # flat: apply_limits maps it to zeros
    ],
)
def test_limits_for_targets_put_the_percentiles_where_the_training_images_have_theirs(
    limits: tuple[float, float], targets: tuple[float, float], expected: tuple[float, float]
) -> None:
    assert limits_for_targets(limits, targets) == pytest.approx(expected)


def test_percentile_window() -> None:
    lo, hi = percentile_window(np.arange(1001, dtype=np.float32))
    assert (lo, hi) == pytest.approx((5.0, 995.0))


def test_resize_squash_keeps_constant_and_range() -> None:
    out = resize_squash(np.full((500, 300), 0.25, dtype=np.float32), 224, 224)
    assert out.shape == (224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


# --------------------------------------------------------------------------- whole pipeline


def _image(
    stored: np.ndarray,
    *,
    bits_allocated: int = 16,
    bits_stored: int = 16,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    **attrs: object,
) -> Dataset:
    """A native (Explicit VR Little Endian) single-frame image with these stored bytes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    dtype = {8: "<u1", 16: "<u2"}[bits_allocated]
    ds.PixelData = stored.astype(dtype).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _bands(*values: int) -> np.ndarray:
    """224 x 224 with len(values) vertical bands; band width divides 224 evenly (no resize)."""
    width = 224 // len(values)
    return np.repeat(np.array(values), width)[None, :].repeat(224, axis=0)


def _band_means(tensor: np.ndarray, n: int) -> list[float]:
    w = 224 // n
    return [float(tensor[:, i * w : (i + 1) * w].mean()) for i in range(n)]


@pytest.mark.parametrize(
    ("stored", "kwargs", "expected"),
    [
        # 8-bit MONOCHROME2, no VOI -> display-ready: the stored range 0-255 is the display range
        (_bands(10, 200), {"bits_allocated": 8, "bits_stored": 8}, [10 / 255, 200 / 255]),
        # the same as MONOCHROME1: inverted
        (_bands(10, 200), {"bits_allocated": 8, "bits_stored": 8, "photometric": "MONOCHROME1"},
         [1 - 10 / 255, 1 - 200 / 255]),
        # 12-bit, no VOI -> percentile window: the values used span 0 to the training images' 99.5th
        # percentile (207/255)
        (_bands(100, 900), {"bits_stored": 12}, [0, 207 / 255]),
        # 12-bit, rescale 0.5/-100 -> 400, 900, 1400; LINEAR window c=900.5 w=1001
        (_bands(1000, 2000, 3000, 2000), {"bits_stored": 12, "RescaleSlope": 0.5,
         "RescaleIntercept": -100, "WindowCenter": 900.5, "WindowWidth": 1001}, [0, 0.5, 1, 0.5]),
        # 15-bit, first of several windows is used: LINEAR_EXACT c=16384 w=32768 -> x / 32768
        (_bands(0, 8192, 16384, 32767), {"bits_stored": 15, "WindowCenter": [16384, 100],
         "WindowWidth": [32768, 50], "VOILUTFunction": "LINEAR_EXACT"},
         [0, 0.25, 0.5, 32767 / 32768]),
        # 16-bit unsigned, no VOI
        (_bands(0, 65535), {}, [0, 207 / 255]),
        # signed 16-bit (two's complement) -1000, 0, 1000; LINEAR c=0.5 w=2001 -> (x+1000)/2000
        (_bands(-1000 & 0xFFFF, 0, 1000, 0), {"signed": True, "WindowCenter": 0.5,
         "WindowWidth": 2001}, [0, 0.5, 1, 0.5]),
        # signed 12-bit stored in 16: 0x0C18 is -1000 once sign-extended from bit 11
        (_bands(0x0C18, 0, 1000, 0), {"signed": True, "bits_stored": 12, "WindowCenter": 0.5,
         "WindowWidth": 2001}, [0, 0.5, 1, 0.5]),
    ],
)
def test_pipeline_table(stored: np.ndarray, kwargs: dict[str, object], expected: list[float]) -> None:
    result = preprocess(_image(stored, **kwargs), SPEC)
    assert result.tensor.shape == (224, 224) and result.tensor.dtype == np.float32
    assert float(result.tensor.min()) >= 0.0 and float(result.tensor.max()) <= 1.0
    np.testing.assert_allclose(_band_means(result.tensor, len(expected)), expected, atol=1e-5)
    assert set(result.timings_ms) == {"decode", "preprocess"}


@pytest.mark.parametrize(
    ("stored", "kwargs", "expected", "source"),
    [
        # 8-bit, no VOI: display-ready, the values are kept as they are
        (_bands(0, 64, 128, 255), {"bits_allocated": 8, "bits_stored": 8}, [0, 64 / 255, 128 / 255, 1],
         "stored_range"),
        # 8-bit with Rescale Slope/Intercept: the limits go through the Modality LUT stage too
        (_bands(0, 255), {"bits_allocated": 8, "bits_stored": 8, "RescaleSlope": 2, "RescaleIntercept": -10},
         [0, 1], "stored_range"),
        # 8-bit with a window: the window wins
        (_bands(10, 200), {"bits_allocated": 8, "bits_stored": 8, "WindowCenter": 105.5, "WindowWidth": 191},
         [0, 1], "window"),
        # 10-bit, no VOI: deeper than display-ready, percentile window
        (_bands(100, 300), {"bits_stored": 10}, [0, 207 / 255], "percentile"),
    ],
)
def test_window_fallback_depends_on_bits_stored(
    stored: np.ndarray, kwargs: dict[str, object], expected: list[float], source: str
) -> None:
    result = preprocess(_image(stored, **kwargs), SPEC)
    assert result.window_source == source
    np.testing.assert_allclose(_band_means(result.tensor, len(expected)), expected, atol=1e-5)


def test_voi_lut_sequence_preferred_over_window() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = [0, 100, 200, 255]
    ds = _image(_bands(0, 1, 2, 3), WindowCenter=1000, WindowWidth=10)
    ds.VOILUTSequence = Sequence([item])
    result = preprocess(ds, SPEC)
    assert result.window_source == "voi_lut"
    np.testing.assert_allclose(_band_means(result.tensor, 4), [0, 100 / 255, 200 / 255, 1], atol=1e-6)


def test_modality_lut_sequence() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = [0, 10, 20, 30]
    ds = _image(_bands(0, 1, 2, 3), WindowCenter=15, WindowWidth=30, VOILUTFunction="LINEAR_EXACT")
    ds.ModalityLUTSequence = Sequence([item])
    np.testing.assert_allclose(_band_means(preprocess(ds, SPEC).tensor, 4), [0, 1 / 3, 2 / 3, 1],
                               atol=1e-6)


# --------------------------------------------------------------------------- real samples


@pytest.fixture(scope="module")
def rg1_reference() -> np.ndarray:
    return preprocess(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")), SPEC).tensor


@pytest.mark.parametrize(
    ("name", "decode_factor", "mean_tol", "p99_tol"),
    [
        ("RG1_UNCI.dcm", 1, 0.002, 0.005),
        ("RG1_J2KR.dcm", 4, 0.01, 0.05),  # reduced-resolution JPEG 2000 decoding
        ("RG1_J2KI.dcm", 4, 0.01, 0.05),
    ],
)
def test_rg1_transfer_syntaxes_agree(
    rg1_reference: np.ndarray, name: str, decode_factor: int, mean_tol: float, p99_tol: float
) -> None:
    result = preprocess(pydicom.dcmread(get_testdata_file(name)), SPEC)
    assert result.decode_factor == decode_factor
    assert result.window_source == "window"
    diff = np.abs(result.tensor - rg1_reference)
    assert float(diff.mean()) < mean_tol
    assert float(np.percentile(diff, 99)) < p99_tol


def test_rg1_is_displayed_white_is_dense(rg1_reference: np.ndarray) -> None:
    # MONOCHROME1 input: after inversion the mediastinum (centre) is brighter than the lung fields
    # and the air outside the body at the top corners is dark.
    centre = rg1_reference[80:160, 100:124].mean()
    lungs = np.mean([rg1_reference[80:160, 50:80].mean(), rg1_reference[80:160, 144:174].mean()])
    assert centre > lungs


def test_display_image_matches_between_syntaxes() -> None:
    native = preprocess(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")), SPEC,
                        display_max_side=1024)
    j2k = preprocess(pydicom.dcmread(get_testdata_file("RG1_J2KI.dcm")), SPEC,
                     display_max_side=1024)
    assert native.display is not None and j2k.display is not None
    assert native.display.shape == j2k.display.shape == (978, 921)
    assert j2k.decode_factor == 2
    assert float(np.abs(native.display - j2k.display).mean()) < 0.01
    np.testing.assert_array_equal(native.tensor, preprocess(
        pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")), SPEC).tensor)


@pytest.mark.parametrize("name", ["MR2_J2KR.dcm", "RG3_J2KI.dcm"])
def test_other_j2k_samples_close_to_native(name: str) -> None:
    native = preprocess(pydicom.dcmread(get_testdata_file(name.replace("J2KR", "UNCR")
                                                          .replace("J2KI", "UNCI"))), SPEC)
    j2k = preprocess(pydicom.dcmread(get_testdata_file(name)), SPEC)
    assert j2k.decode_factor > 1
    assert float(np.abs(native.tensor - j2k.tensor).mean()) < 0.02


def test_display_image_helper() -> None:
    image = display_image(pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm")), SPEC, max_side=512)
    assert image.dtype == np.float32 and max(image.shape) <= 512
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_j2k_reduction_is_capped_at_the_codestream_levels() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR2_J2KR.dcm"))  # 1024 x 1024, 5 levels
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    decoded = decode_j2k_reduced(frame, 9)
    assert decoded is not None
    arr, used = decoded
    assert used == 5 and arr.shape == (32, 32)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "SC_rgb.dcm"])
def test_colour_is_unsupported(name: str) -> None:
    with pytest.raises(UnsupportedImageError, match="monochrome"):
        preprocess(pydicom.dcmread(get_testdata_file(name)), SPEC)


def test_multi_frame_is_unsupported() -> None:
    with pytest.raises(UnsupportedImageError, match="multi-frame"):
        preprocess(pydicom.dcmread(get_testdata_file("emri_small.dcm")), SPEC)


def test_missing_pixel_data() -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    with pytest.raises(MissingPixelDataError):
        preprocess(ds, SPEC)


def test_truncated_native_pixel_data_is_corrupt() -> None:
    ds = _image(_bands(1, 2))
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(CorruptPixelDataError):
        preprocess(ds, SPEC)


def test_damaged_jpeg2000_is_corrupt() -> None:
    ds = _image(_bands(1, 2))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    with pytest.raises(CorruptPixelDataError, match="JPEG 2000"):
        preprocess(ds, SPEC)
