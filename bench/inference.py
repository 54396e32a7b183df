"""Inference latency and throughput benchmark (a script, not a test).

Measures, for the same model in the same run:
* per-stage latency (read, decode, preprocess, infer, total; median and p95) of classify_file on
  the RG1 chest radiograph in each transfer syntax the pydicom-data set has (native, J2K lossless,
  J2K lossy);
* throughput (images/s) of classify_file at batch 1 (one caller) and with micro-batching
  (N concurrent callers);
* the bare ONNX Runtime floor: session.run on a prepared tensor, batch 1 and batch max_batch.

Usage: .venv/bin/python bench/inference.py [--model DIR] [--repeats N] [--concurrency N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script (`python bench/inference.py`): the repository root goes on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.applicability import SiteRules
from inference.engine import EngineOptions, InferenceEngine
from inference.errors import ModelPackageError
from inference.manifest import load_manifest
from inference.pipeline import classify_file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "inference" / "models" / "pneumonia-effnetb0"
SAMPLES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
STAGES = ("read", "decode", "preprocess", "infer", "total")
#: RG1 is an adult's radiograph, outside the bundled model's intended use (children): the bench
#: widens the age rule so that the full path (decode, preprocess, infer) of a full-size CR is timed.
TIMING_RULES = SiteRules(min_age_years=0, max_age_years=150, unknown_age="analyse")


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"median": round(float(np.median(arr)), 2), "p95": round(float(np.percentile(arr, 95)), 2)}


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def stage_latency(engine: InferenceEngine, path: str, repeats: int) -> dict[str, Any]:
    per_stage: dict[str, list[float]] = {s: [] for s in (*STAGES, "decode+preprocess+infer")}
    classify_file(path, engine, TIMING_RULES)  # warm caches
    for _ in range(repeats):
        outcome = classify_file(path, engine, TIMING_RULES)
        t = outcome.timings_ms
        for s in STAGES:
            per_stage[s].append(t[s])
        per_stage["decode+preprocess+infer"].append(t["decode"] + t["preprocess"] + t["infer"])
    return {s: _stats(v) for s, v in per_stage.items()}


def throughput(engine: InferenceEngine, path: str, images: int, concurrency: int) -> dict[str, float]:
    counter = iter(range(images))
    lock = threading.Lock()
    batch_sizes: list[int] = []

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            outcome = classify_file(path, engine, TIMING_RULES)
            assert outcome.prediction is not None
            with lock:
                batch_sizes.append(outcome.prediction.batch_size)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"images_per_s": round(images / elapsed, 1), "mean_batch": round(statistics.mean(batch_sizes), 2)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model directory")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--spin", action="store_true", help="let ORT threads busy-wait")
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    args = parser.parse_args(argv)

    if not (args.model / "model.json").is_file():
        print(f"ERROR: no model package at {args.model} (model.json missing). The bundled model "
              "is produced by inference/training; pass --model DIR to benchmark another one.",
              file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(args.model)
    except ModelPackageError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2

    from pydicom.data import get_testdata_file

    options = EngineOptions(intra_op_threads=args.intra_op_threads, max_batch=args.max_batch,
                            max_wait_ms=args.max_wait_ms, allow_spinning=args.spin)
    result: dict[str, Any] = {
        "model": {"id": manifest.id, "version": manifest.version, "dir": str(args.model)},
        "repeats": args.repeats,
        "options": {"intra_op_threads": args.intra_op_threads, "max_batch": args.max_batch,
                    "max_wait_ms": args.max_wait_ms, "allow_spinning": args.spin},
    }
    with InferenceEngine(manifest, options) as engine:
        result["providers"] = engine.providers
        h, w = manifest.preprocessing.height, manifest.preprocessing.width
        one = np.random.default_rng(0).random((1, 1, h, w), dtype=np.float32)
        many = np.repeat(one, engine.max_batch, axis=0)
        engine.run_direct(one)
        floor1 = _timed(lambda: engine.run_direct(one), args.repeats)
        floorb = _timed(lambda: engine.run_direct(many), max(5, args.repeats // 4))
        result["ort_floor"] = {
            "batch1_ms": _stats(floor1),
            f"batch{engine.max_batch}_ms": _stats(floorb),
            "batch1_images_per_s": round(1e3 / float(np.median(floor1)), 1),
            f"batch{engine.max_batch}_images_per_s":
                round(engine.max_batch * 1e3 / float(np.median(floorb)), 1),
        }
        result["latency_ms"] = {
            name: stage_latency(engine, get_testdata_file(name), args.repeats) for name in SAMPLES
        }
        uncr = get_testdata_file("RG1_UNCR.dcm")
        n = max(args.repeats, 2 * args.concurrency)
        result["throughput_RG1_UNCR"] = {
            "batch1_sequential": throughput(engine, uncr, n, 1),
            f"concurrent{args.concurrency}_microbatched": throughput(engine, uncr, n * 2, args.concurrency),
        }

    print(f"model {manifest.id} {manifest.version} ({args.model}); providers {result['providers']}")
    print(f"{'file':<14}" + "".join(f"{s:>26}" for s in (*STAGES, "decode+preprocess+infer")))
    for name, stages in result["latency_ms"].items():
        print(f"{name:<14}" + "".join(
            f"{stages[s]['median']:>14.2f} (p95 {stages[s]['p95']:>6.1f})"
            for s in (*STAGES, "decode+preprocess+infer")))
    print("ORT floor:", json.dumps(result["ort_floor"]))
    print("throughput RG1_UNCR:", json.dumps(result["throughput_RG1_UNCR"]))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
