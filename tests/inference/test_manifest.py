"""model.json loading: strict on what the runtime needs, tolerant of the rest, hash enforced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from inference.errors import ModelIntegrityError, ModelPackageError
from inference.manifest import load_manifest
from storage.uids import derive_uid
from tests.inference.tiny_model import MODEL_ID, MODEL_VERSION, write_model_dir


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model")


def _rewrite(model_dir: Path, mutate: Any) -> None:
    path = model_dir / "model.json"
    raw = json.loads(path.read_text())
    mutate(raw)
    path.write_text(json.dumps(raw))


def test_loads_valid_package(model_dir: Path) -> None:
    m = load_manifest(model_dir)
    assert (m.id, m.version) == (MODEL_ID, MODEL_VERSION)
    assert m.labels == ("NORMAL", "PNEUMONIA")
    assert m.positive_label == "PNEUMONIA" and m.negative_label == "NORMAL"
    assert m.threshold == 0.5
    assert m.input_name == "image" and m.input_shape == ("batch", 1, 224, 224)
    assert (m.preprocessing.height, m.preprocessing.width) == (224, 224)
    assert m.probability.name == "probability" and m.cam.name == "cam"
    assert m.onnx_path == model_dir.resolve() / "model.onnx"
    assert m.device_uid == derive_uid("device", MODEL_ID, MODEL_VERSION)


def test_device_uid_changes_with_version(model_dir: Path) -> None:
    before = load_manifest(model_dir).device_uid
    _rewrite(model_dir, lambda raw: raw.update(version="0.0.2"))
    assert load_manifest(model_dir).device_uid != before


def test_hash_mismatch_is_refused(model_dir: Path) -> None:
    onnx_path = model_dir / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\x00")
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        load_manifest(model_dir)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match="no model.json"):
        load_manifest(tmp_path)


def test_missing_onnx_file(model_dir: Path) -> None:
    (model_dir / "model.onnx").unlink()
    with pytest.raises(ModelPackageError, match="'onnx_file'"):
        load_manifest(model_dir)


def test_invalid_json(model_dir: Path) -> None:
    (model_dir / "model.json").write_text("{not json")
    with pytest.raises(ModelPackageError, match="not valid JSON"):
        load_manifest(model_dir)


def _drop(path: str) -> Any:
    def mutate(raw: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        del node[leaf]

    return mutate


@pytest.mark.parametrize(
    "key",
    ["id", "version", "threshold", "labels", "onnx_sha256", "input.name", "preprocessing.width",
     "outputs.cam", "outputs.probability.name", "intended_use"],
)
def test_missing_key_is_named(model_dir: Path, key: str) -> None:
    _rewrite(model_dir, _drop(key))
    with pytest.raises(ModelPackageError, match=f"'{key}'"):
        load_manifest(model_dir)


@pytest.mark.parametrize(
    ("update", "named"),
    [
        ({"schema": 2}, "'schema'"),
        ({"positive_label": "COVID"}, "'positive_label'"),
        ({"labels": ["NORMAL"]}, "'labels'"),
        ({"onnx_file": "../model.onnx"}, "'onnx_file'"),
        ({"onnx_sha256": "abc"}, "'onnx_sha256'"),
        ({"threshold": 1.5}, "'threshold'"),
        ({"threshold": "0.5"}, "'threshold'"),
        ({"input": {"name": "image", "shape": ["batch", 1, 256, 256], "dtype": "float32"}},
         "'input.shape'"),
        ({"input": {"name": "image", "shape": ["batch", 1, 224, 224], "dtype": "float16"}},
         "'input.dtype'"),
    ],
)
def test_invalid_values_are_named(model_dir: Path, update: dict[str, Any], named: str) -> None:
    _rewrite(model_dir, lambda raw: raw.update(update))
    with pytest.raises(ModelPackageError, match=named):
        load_manifest(model_dir, verify_integrity=False)


@pytest.mark.parametrize(
    ("key", "value"),
    [("resize", "letterbox"), ("channels", 3), ("photometric", "MONOCHROME1"),
     ("value_range", [-1, 1])],
)
def test_unsupported_preprocessing_is_refused(model_dir: Path, key: str, value: Any) -> None:
    _rewrite(model_dir, lambda raw: raw["preprocessing"].update({key: value}))
    with pytest.raises(ModelPackageError, match=f"'preprocessing.{key}'"):
        load_manifest(model_dir)
