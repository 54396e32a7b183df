"""Fit the temperature of a shipped model on its validation split, without retraining.

Runs the model package once over the patient-wise validation split (re-created from the seed in
``model.json``) through the real DICOM path, fits T by minimising the NLL of
``sigmoid(logit(p) / T)`` (:func:`inference.calibration.fit_temperature`) and reports ECE (10
equal-width bins), Brier score and NLL before and after. With ``--write`` it stores
``calibration`` in ``model.json`` (the ONNX file, hence ``onnx_sha256``, is untouched).

Caveat, also written into the manifest: the split is the one that already chose the best epoch
and the threshold, so the calibration figures measured on it are optimistic.

Usage::

    python -m inference.training.calibrate [--model DIR] [--data-root DIR] [--out calibration.json] [--write]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference.calibration import apply_temperature, brier, expected_calibration_error, fit_temperature, logit, nll, sigmoid
from inference.example_dicom import wrap_radiograph
from inference.manifest import BUNDLED_MODEL_DIR, MANIFEST_FILE, load_manifest
from inference.training.evaluation import (
    DEFAULT_DATA_ROOT,
    load_images,
    open_engine,
    raw_probabilities,
    to_jsonable,
    validation_set,
)
from inference.training.train import sensitivity_specificity


def calibration_report(labels: np.ndarray, raw: np.ndarray, temperature: float) -> dict[str, Any]:
    """ECE/Brier/NLL before and after *temperature* (pure)."""
    calibrated = sigmoid(logit(raw) / temperature)
    return {
        "before": {
            "ece_10_bins": expected_calibration_error(labels, raw),
            "brier": brier(labels, raw),
            "nll": nll(labels, raw),
        },
        "after": {
            "ece_10_bins": expected_calibration_error(labels, calibrated),
            "brier": brier(labels, calibrated),
            "nll": nll(labels, calibrated),
        },
    }


def write_calibration(model_dir: Path, calibration: dict[str, Any]) -> None:
    """Insert/replace ``calibration`` in ``model.json`` right after ``threshold_rule``."""
    path = model_dir / MANIFEST_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw.pop("calibration", None)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        out[key] = value
        if key == "threshold_rule":
            out["calibration"] = calibration
    out.setdefault("calibration", calibration)
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL_DIR)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the report JSON here")
    parser.add_argument("--write", action="store_true", help="store the temperature in model.json")
    parser.add_argument("--scores", type=Path, default=None, help="save labels, patients and raw probabilities (.npz)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    manifest = load_manifest(args.model)
    val = validation_set(manifest, args.data_root)
    images = load_images(args.data_root, val.records)
    with open_engine(manifest, args.threads) as engine:
        raw = raw_probabilities(engine, images, lambda pixels, _i: wrap_radiograph(pixels))
    labels = val.labels
    if args.scores is not None:
        np.savez(args.scores, labels=labels, raw=raw, patients=np.asarray(val.patients))
    temperature = fit_temperature(labels, raw)
    sens, spec = sensitivity_specificity(labels, raw, manifest.network_threshold)
    report = {
        "model": {"id": manifest.id, "version": manifest.version, "onnx_sha256": manifest.onnx_sha256},
        "split": val.description,
        "n": int(labels.size),
        "n_positive": int(labels.sum()),
        "temperature": temperature,
        "threshold_raw": manifest.network_threshold,
        "threshold_calibrated": apply_temperature(manifest.network_threshold, temperature),
        "sensitivity_at_threshold": sens,
        "specificity_at_threshold": spec,
        **calibration_report(labels, raw, temperature),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(to_jsonable(report), indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(to_jsonable(report), indent=2) + "\n")
    if args.write:
        write_calibration(
            args.model,
            {
                "method": "temperature",
                "temperature": round(temperature, 4),
                "fitted_on": (
                    f"the patient-wise validation split ({val.description}) through the DICOM runtime path; "
                    "the same split chose the best epoch and the threshold, so calibration measured on it is optimistic"
                ),
                "threshold_calibrated": round(apply_temperature(manifest.network_threshold, round(temperature, 4)), 6),
                "ece_10_bins": {
                    "before": round(report["before"]["ece_10_bins"], 4),
                    "after": round(report["after"]["ece_10_bins"], 4),
                },
                "brier": {"before": round(report["before"]["brier"], 4), "after": round(report["after"]["brier"], 4)},
                "nll": {"before": round(report["before"]["nll"], 4), "after": round(report["after"]["nll"], 4)},
                "command": "python -m inference.training.calibrate --write",
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
