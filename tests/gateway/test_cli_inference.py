"""``pneumo infer`` and ``pneumo model info`` as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import sample
from tests.gateway.serve_process import pneumo, write_config
from tests.inference.tiny_model import MODEL_ID, MODEL_VERSION, write_model_dir

FIELDS = {"file", "sop_instance_uid", "applicable", "reason", "probability", "label", "threshold", "model", "timings_ms"}


def test_infer_prints_one_json_line_per_file(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model")
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var")
    result = pneumo(config, "infer", "--model", str(model), str(sample("RG1_UNCR.dcm")), str(sample("CT_small.dcm")))
    assert result.returncode == 0, result.stderr
    chest, ct = (json.loads(line) for line in result.stdout.splitlines())
    assert set(chest) == FIELDS and set(ct) == FIELDS
    assert chest["applicable"] is True and chest["reason"] is None
    assert 0.0 <= chest["probability"] <= 1.0 and chest["label"] in ("PNEUMONIA", "NORMAL")
    assert chest["model"] == {"id": MODEL_ID, "version": MODEL_VERSION}
    assert set(chest["timings_ms"]) == {"decode", "preprocess", "infer"}
    assert ct["applicable"] is False and "CT" in ct["reason"] and ct["probability"] is None


def test_infer_exit_code_only_for_unreadable_input(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model")
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var")
    junk = tmp_path / "notes.txt"
    junk.write_text("not a radiograph")
    result = pneumo(config, "infer", "--model", str(model), str(junk), str(sample("RG1_UNCR.dcm")))
    assert result.returncode == 1
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert "error" in first and second["applicable"] is True


def test_model_info_verifies_the_hash(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "model")
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var")
    ok = pneumo(config, "model", "info", "--model", str(model))
    assert ok.returncode == 0 and json.loads(ok.stdout)["manifest"]["id"] == MODEL_ID
    with (model / "model.onnx").open("ab") as handle:
        handle.write(b"tampered")
    bad = pneumo(config, "model", "info", "--model", str(model))
    assert bad.returncode == 1 and "sha256" in json.loads(bad.stdout)["error"].lower()


def test_serve_refuses_a_tampered_model(tmp_path: Path) -> None:
    import subprocess
    import sys

    model = write_model_dir(tmp_path / "model")
    (model / "model.onnx").write_bytes((model / "model.onnx").read_bytes() + b"x")
    config = write_config(
        tmp_path / "pneumo.toml", tmp_path / "var", workers=True, extra=f'[inference]\nmodel_dir = "{model}"'
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "ModelIntegrityError" in result.stderr or "sha256" in result.stderr.lower()
