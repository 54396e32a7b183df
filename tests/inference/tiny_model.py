"""A small but real ONNX model that honours the model contract, for testing the runtime.

Graph: image [N,1,224,224] -> AveragePool 32x32/32 -> cam [N,7,7];
probability = sigmoid(8 * (mean(cam) - 0.5)). So a brighter image has a higher probability,
and the expected outputs can be computed with numpy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

MODEL_ID = "tiny-contract-test"
MODEL_VERSION = "0.0.1"


def build_onnx(batch_dim: str | int = "batch") -> bytes:
    """Serialized ONNX model honouring the contract (opset 17)."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch_dim, 1, 224, 224])
    prob = helper.make_tensor_value_info("probability", TensorProto.FLOAT, [batch_dim])
    cam = helper.make_tensor_value_info("cam", TensorProto.FLOAT, [batch_dim, 7, 7])
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Squeeze", ["pooled", "axis1"], ["cam"]),
        helper.make_node("ReduceMean", ["cam"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Sub", ["mean", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    inits = [
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [8.0]),
    ]
    graph = helper.make_graph(nodes, "tiny", [image], [prob, cam], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def expected(tensor: np.ndarray) -> tuple[float, np.ndarray]:
    """What the tiny model computes for one [224,224] tensor, in numpy."""
    cam = tensor.astype(np.float64).reshape(7, 32, 7, 32).mean(axis=(1, 3))
    prob = 1.0 / (1.0 + np.exp(-8.0 * (cam.mean() - 0.5)))
    return float(prob), cam.astype(np.float32)


def manifest_dict(onnx_bytes: bytes, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "schema": 1,
        "id": MODEL_ID,
        "name": "Tiny contract model",
        "version": MODEL_VERSION,
        "manufacturer": "Pneumo Gateway tests",
        "labels": ["NORMAL", "PNEUMONIA"],
        "positive_label": "PNEUMONIA",
        "onnx_file": "model.onnx",
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "input": {"name": "image", "shape": ["batch", 1, 224, 224], "dtype": "float32"},
        "preprocessing": {
            "width": 224,
            "height": 224,
            "resize": "squash",
            "channels": 1,
            "value_range": [0, 1],
            "photometric": "MONOCHROME2",
            "normalisation": "inside graph",
        },
        "outputs": {
            "probability": {"name": "probability", "shape": ["batch"], "semantics": "sigmoid"},
            "cam": {"name": "cam", "shape": ["batch", 7, 7], "semantics": "logit contribution"},
        },
        "threshold": 0.5,
        "threshold_rule": "fixed for tests",
        "intended_use": "testing the runtime only",
        "training_data": {"note": "none"},
        "metrics": {},
        "training": {},
        "created": "2026-01-01T00:00:00Z",
        "extra_key_the_runtime_ignores": True,
    }
    raw.update(overrides)
    return raw


def write_model_dir(directory: Path, batch_dim: str | int = "batch", **overrides: Any) -> Path:
    """Write model.onnx + model.json into *directory* and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    data = build_onnx(batch_dim)
    (directory / "model.onnx").write_bytes(data)
    (directory / "model.json").write_text(json.dumps(manifest_dict(data, **overrides)))
    return directory
