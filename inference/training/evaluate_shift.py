"""Evaluate the shipped model under simulated acquisition shift (:mod:`inference.training.shifts`).

For each condition the validation images (re-created patient-wise split, optionally a subsample
of whole patients) are wrapped as DICOM, shifted, decoded and preprocessed by the runtime, and
classified by the verified ONNX model. Reported per condition: AUC with a patient-cluster
bootstrap 95 % interval, sensitivity and specificity at the shipped threshold (intervals from the
same bootstrap), ECE (10 bins) of the calibrated probability, and the mean change of the raw
probability against the clean image.

It also applies the operating-point rule proposed for the next model (inference/training/
EXPERIMENTS.md): the highest threshold whose sensitivity, averaged over all conditions, stays
>= the target (0.93) — and reports what it would give. It does not change the shipped threshold.

Usage::

    python -m inference.training.evaluate_shift [--limit 400] [--out-dir inference/training/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.calibration import expected_calibration_error, logit, sigmoid
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from inference.training.evaluation import (
    DEFAULT_DATA_ROOT,
    load_images,
    open_engine,
    raw_probabilities,
    to_jsonable,
    validation_set,
)
from inference.training.shifts import SHIFTS
from inference.training.train import bootstrap_metrics, sensitivity_specificity

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def shift_threshold(
    labels: npt.NDArray[np.int64], scores: dict[str, npt.NDArray[np.float64]], target: float
) -> dict[str, Any]:
    """Highest threshold whose sensitivity averaged over the conditions is >= *target* (pure).

    Candidates are all observed positive scores; mean sensitivity only falls as the threshold
    rises, so the highest qualifying candidate maximises specificity under the constraint.
    """
    positives = np.unique(np.concatenate([s[labels == 1] for s in scores.values()]))[::-1]
    chosen = float(positives[-1])
    for candidate in positives:
        sens = np.mean([sensitivity_specificity(labels, s, float(candidate))[0] for s in scores.values()])
        if sens >= target:
            chosen = float(candidate)
            break
    per = {name: sensitivity_specificity(labels, s, chosen) for name, s in scores.items()}
    return {
        "rule": f"highest threshold with sensitivity averaged over all {len(scores)} conditions >= {target}",
        "threshold_raw": chosen,
        "mean_sensitivity": float(np.mean([v[0] for v in per.values()])),
        "mean_specificity": float(np.mean([v[1] for v in per.values()])),
        "min_sensitivity": float(min(v[0] for v in per.values())),
        "per_condition": {k: {"sensitivity": v[0], "specificity": v[1]} for k, v in per.items()},
    }


def markdown_table(rows: list[dict[str, Any]], threshold: float) -> str:
    """The per-condition table for MODEL_CARD.md / EXPERIMENTS.md (pure)."""
    lines = [
        f"| condition | AUC [95% CI] | sensitivity @ {threshold:.4f} [95% CI] | specificity [95% CI] "
        "| ECE (cal.) | mean Δp vs clean |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, se, sp = r["auc"], r["sensitivity"], r["specificity"]
        lines.append(
            f"| {r['name']} | {a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] "
            f"| {se['value']:.3f} [{se['ci95'][0]:.3f}, {se['ci95'][1]:.3f}] "
            f"| {sp['value']:.3f} [{sp['ci95'][0]:.3f}, {sp['ci95'][1]:.3f}] "
            f"| {r['ece_calibrated']:.3f} | {r['mean_delta_p']:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL_DIR)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--limit", type=int, default=None, help="subsample about this many images (whole patients)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsample")
    parser.add_argument("--resamples", type=int, default=1000, help="patient-cluster bootstrap resamples")
    parser.add_argument("--target-sensitivity", type=float, default=0.93)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="run only these conditions (names)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    manifest = load_manifest(args.model)
    val = validation_set(manifest, args.data_root, limit=args.limit, seed=args.seed)
    images = load_images(args.data_root, val.records)
    shifts = [s for s in SHIFTS if args.only is None or s.name in args.only or s.name == "clean"]
    threshold = manifest.network_threshold
    temperature = manifest.calibration.temperature
    scores: dict[str, npt.NDArray[np.float64]] = {}
    rows: list[dict[str, Any]] = []
    with open_engine(manifest, args.threads) as engine:
        for shift in shifts:
            ts = time.perf_counter()
            raw = raw_probabilities(engine, images, shift.make)
            scores[shift.name] = raw
            metrics = bootstrap_metrics(val.labels, raw, val.patients, threshold, resamples=args.resamples).to_json()
            rows.append(
                {
                    "name": shift.name,
                    "description": shift.description,
                    "auc": metrics["auc"],
                    "sensitivity": metrics["sensitivity"],
                    "specificity": metrics["specificity"],
                    "ece_calibrated": expected_calibration_error(val.labels, sigmoid(logit(raw) / temperature)),
                    "mean_delta_p": float(np.mean(raw - scores["clean"])),
                    "seconds": time.perf_counter() - ts,
                }
            )
            print(f"{shift.name}: AUC {metrics['auc']['value']:.4f} sens {metrics['sensitivity']['value']:.3f} "
                  f"spec {metrics['specificity']['value']:.3f} ({time.perf_counter() - ts:.0f}s)", flush=True)
    report = {
        "model": {"id": manifest.id, "version": manifest.version, "onnx_sha256": manifest.onnx_sha256},
        "split": val.description,
        "n": int(val.labels.size),
        "n_positive": int(val.labels.sum()),
        "n_patients": len(set(val.patients)),
        "threshold_raw": threshold,
        "temperature": temperature,
        "bootstrap": f"patient-cluster bootstrap, {args.resamples} resamples, percentile 95% interval; threshold fixed",
        "conditions": rows,
        "operating_point_proposal": shift_threshold(val.labels, scores, args.target_sensitivity),
        "command": "python -m inference.training.evaluate_shift " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": time.perf_counter() - t0,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "shift_eval.json").write_text(json.dumps(to_jsonable(report), indent=2) + "\n")
    (args.out_dir / "shift_eval.md").write_text(markdown_table(rows, threshold))
    print(markdown_table(rows, threshold))
    print(json.dumps(to_jsonable(report["operating_point_proposal"]), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
