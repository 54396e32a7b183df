"""The engine against a real (tiny) ONNX model that honours the contract; and classify_file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from inference.engine import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    EngineOptions,
    InferenceEngine,
    Prediction,
    select_providers,
)
from inference.errors import (
    CorruptPixelDataError,
    EngineError,
    ModelPackageError,
    UnsupportedImageError,
)
from inference.manifest import ModelManifest, load_manifest
from inference.pipeline import classify_file
from tests.inference.tiny_model import MODEL_ID, MODEL_VERSION, expected, write_model_dir


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> ModelManifest:
    return load_manifest(write_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def engine(manifest: ModelManifest) -> Iterator[InferenceEngine]:
    with InferenceEngine(manifest, EngineOptions(intra_op_threads=1, max_wait_ms=20)) as eng:
        yield eng


def _tensors(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    return [rng.random((224, 224), dtype=np.float32) * (i + 1) / n for i in range(n)]


def test_predict_matches_numpy(engine: InferenceEngine) -> None:
    tensor = _tensors(1)[0]
    prob, cam = expected(tensor)
    p = engine.predict(tensor, {"decode": 1.5, "preprocess": 2.5})
    assert p.probability == pytest.approx(prob, abs=1e-6)
    assert p.cam.shape == (7, 7) and p.cam.dtype == np.float32
    np.testing.assert_allclose(p.cam, cam, atol=1e-6)
    assert (p.model_id, p.model_version, p.threshold) == (MODEL_ID, MODEL_VERSION, 0.5)
    assert p.timings_ms["decode"] == 1.5 and p.timings_ms["preprocess"] == 2.5
    assert p.timings_ms["infer"] > 0


@pytest.mark.parametrize(("value", "label"), [(1.0, "PNEUMONIA"), (0.5, "PNEUMONIA"), (0.0, "NORMAL")])
def test_label_follows_threshold(engine: InferenceEngine, value: float, label: str) -> None:
    # mean 0.5 -> sigmoid(0) = 0.5 = threshold -> positive (probability >= threshold)
    p = engine.predict(np.full((1, 224, 224), value, dtype=np.float32))
    assert p.label == label


def test_concurrent_callers_are_batched_and_match_single(manifest: ModelManifest) -> None:
    tensors = _tensors(16)
    with InferenceEngine(manifest, EngineOptions(max_batch=8, max_wait_ms=200)) as eng:
        singles = [eng.predict(t) for t in tensors[:2]]  # lone callers: batch of one
        assert [p.batch_size for p in singles] == [1, 1]
        barrier = threading.Barrier(len(tensors))
        results: dict[int, Prediction] = {}

        def call(i: int) -> None:
            barrier.wait()
            results[i] = eng.predict(tensors[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(tensors))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    batched = [results[i] for i in range(len(tensors))]
    assert max(p.batch_size for p in batched) > 1
    for i, p in enumerate(batched):
        prob, cam = expected(tensors[i])
        assert p.probability == pytest.approx(prob, abs=1e-6)
        np.testing.assert_allclose(p.cam, cam, atol=1e-6)


def test_predict_batch_equals_predict(engine: InferenceEngine) -> None:
    tensors = _tensors(11)
    batch = engine.predict_batch(tensors)
    singles = [engine.predict(t) for t in tensors]
    assert [p.probability for p in batch] == pytest.approx([p.probability for p in singles], abs=1e-7)
    assert max(p.batch_size for p in batch) <= engine.max_batch


def test_fixed_batch_of_one_graph(tmp_path: Path) -> None:
    manifest = load_manifest(write_model_dir(tmp_path, batch_dim=1))
    with InferenceEngine(manifest, EngineOptions(max_batch=8)) as eng:
        assert eng.max_batch == 1
        assert [p.batch_size for p in eng.predict_batch(_tensors(3))] == [1, 1, 1]


@pytest.mark.parametrize("shape", [(224,), (2, 224, 224), (224, 223), (1, 1, 224, 224)])
def test_bad_tensor_shape(engine: InferenceEngine, shape: tuple[int, ...]) -> None:
    with pytest.raises(EngineError, match="shape"):
        engine.predict(np.zeros(shape, dtype=np.float32))


def test_nan_tensor_refused(engine: InferenceEngine) -> None:
    with pytest.raises(EngineError, match="NaN"):
        engine.predict(np.full((224, 224), np.nan, dtype=np.float32))


def test_closed_engine_refuses(manifest: ModelManifest) -> None:
    eng = InferenceEngine(manifest, EngineOptions(warmup=False))
    eng.close()
    eng.close()  # idempotent
    with pytest.raises(EngineError, match="closed"):
        eng.predict(np.zeros((224, 224), dtype=np.float32))


def test_output_name_mismatch_is_a_package_error(tmp_path: Path) -> None:
    outputs = {
        "probability": {"name": "prob", "shape": ["batch"], "semantics": ""},
        "cam": {"name": "cam", "shape": ["batch", 7, 7], "semantics": ""},
    }
    manifest = load_manifest(write_model_dir(tmp_path, outputs=outputs))
    with pytest.raises(ModelPackageError, match="outputs.probability.name"):
        InferenceEngine(manifest)


@pytest.mark.parametrize(
    ("allow", "available", "chosen"),
    [
        (True, [CUDA_PROVIDER, CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER]),
        (False, [CUDA_PROVIDER, CPU_PROVIDER], [CPU_PROVIDER]),
        (True, [CPU_PROVIDER], [CPU_PROVIDER]),
    ],
)
def test_select_providers(allow: bool, available: list[str], chosen: list[str]) -> None:
    assert select_providers(allow, available) == chosen


# --------------------------------------------------------------------------- classify_file


def test_classify_chest_radiograph(engine: InferenceEngine) -> None:
    outcome = classify_file(get_testdata_file("RG1_UNCR.dcm"), engine)
    assert outcome.applicable and outcome.reason is None
    assert outcome.sop_instance_uid.startswith("1.")
    assert outcome.prediction is not None
    assert 0.0 <= outcome.prediction.probability <= 1.0
    assert {"read", "decode", "preprocess", "infer", "total"} <= set(outcome.timings_ms)


@pytest.mark.parametrize(("name", "fragment"), [("RG3_UNCR.dcm", "EXTREMITY"), ("MR2_UNCR.dcm", "MR"),
                                                ("US1_UNCR.dcm", "US")])
def test_classify_not_applicable(engine: InferenceEngine, name: str, fragment: str) -> None:
    outcome = classify_file(get_testdata_file(name), engine)
    assert not outcome.applicable and outcome.prediction is None
    assert outcome.reason is not None and fragment in outcome.reason


def test_classify_non_dicom(engine: InferenceEngine, tmp_path: Path) -> None:
    path = tmp_path / "not.dcm"
    path.write_bytes(b"hello")
    with pytest.raises(UnsupportedImageError, match="not a DICOM file"):
        classify_file(path, engine)


def test_classify_truncated_file_is_corrupt(engine: InferenceEngine, tmp_path: Path) -> None:
    data = Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptPixelDataError):
        classify_file(path, engine)
