"""A whole training campaign on one GPU: k-fold cross-validation, final models, distillation.

Why: on the 2-core CPU host one model takes 65–80 minutes, so a recipe could never be
cross-validated or averaged. A GPU lease is short (minutes) and one command long, so this driver
runs everything clock-paced inside fixed budgets and leaves the results in a few files:

1. **Phase 1, in parallel** (one ``train`` process each, sharing the GPU; on an H200 the processes
   time-slice it, so parallelism buys little throughput but lets every run end together inside
   one budget — EXPERIMENTS.md, experiment 5): the *k* cross-validation folds of the training part of
   the patient split (``--folds k --fold i``, out-of-fold probabilities clean and under the pixel
   shifts in ``val_scores.npz``), and *n* final models of different seeds on the whole training
   part. Every run keeps its last epoch (``--select last``): no validation data chooses anything.
   The held-out validation split (15 % of the patients) is touched by no fold and no training.
2. **Phase 2**: one student distilled from the final models (their mean probability as a soft
   target), so that the ensemble's gain fits the single-network latency budget.
3. **Pack** (``--pack DIR``): each final model and the student as a half-precision checkpoint
   (``export`` widens it again), every run's ``val_scores.npz``, logs and histories in one tar,
   and ``summary.json`` with the pooled out-of-fold AUC per condition and every run's validation
   figures.

Usage (recipe arguments after ``--`` go to every ``train`` process)::

    python -m inference.training.campaign --out-dir runs --device cuda --minutes 4.5 \\
        --distill-minutes 2.5 --pack out -- --augmentation shift --bf16 --ema-decay 0.998
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .train import bootstrap_metrics, roc_auc


@dataclass(frozen=True)
class Run:
    """One ``train`` process: its name (= folder under the campaign's out dir) and its arguments."""

    name: str
    args: tuple[str, ...]


def phase_one(folds: int, seeds: Sequence[int], split_seed: int) -> list[Run]:
    """The cross-validation folds and the final models (pure)."""
    common = ("--select", "last", "--score-shifts", "--split-seed", str(split_seed))
    runs = [Run(f"fold{i}", (*common, "--folds", str(folds), "--fold", str(i))) for i in range(folds)]
    runs += [Run(f"final{j}", (*common, "--seed", str(seed))) for j, seed in enumerate(seeds)]
    return runs


def student_run(teachers: Sequence[Path], split_seed: int, seed: int) -> Run:
    """The distilled student (pure)."""
    args: list[str] = ["--select", "last", "--score-shifts", "--split-seed", str(split_seed), "--seed", str(seed)]
    for t in teachers:
        args += ["--teacher", str(t)]
    return Run("student", tuple(args))


def launch(runs: Sequence[Run], out_dir: Path, device: str, minutes: float, recipe: Sequence[str]) -> dict[str, int]:
    """Start every run at once, wait for all, return each one's exit status."""
    procs: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
    for run in runs:
        run_dir = out_dir / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "inference.training.train", "--out-dir", str(run_dir), "--device", device,
            "--time-budget", str(minutes), "--no-resume", *recipe, *run.args,
        ]  # fmt: skip
        (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
        log = (out_dir / f"{run.name}.log").open("wb")
        procs[run.name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
        print(f"started {run.name}", flush=True)
    status: dict[str, int] = {}
    while procs:
        for name, (proc, log_file) in list(procs.items()):
            code = proc.poll()
            if code is not None:
                status[name] = code
                log_file.close()
                del procs[name]
                print(f"{name} exited {code}", flush=True)
        time.sleep(1.0)
    return status


def pooled_oof(out_dir: Path, folds: int) -> dict[str, Any]:
    """Out-of-fold AUC per condition, pooled over the folds that finished, and per fold."""
    files = [out_dir / f"fold{i}" / "val_scores.npz" for i in range(folds)]
    parts = [np.load(f) for f in files if f.is_file()]
    conditions = [k.removeprefix("score_") for k in parts[0].files if k.startswith("score_")]
    labels = np.concatenate([p["labels"] for p in parts])
    patients = [str(x) for p in parts for x in p["patients"]]
    clean = bootstrap_metrics(labels, np.concatenate([p["score_clean"] for p in parts]), patients, 0.5)
    return {
        "n_images": int(labels.size),
        "n_positive": int(labels.sum()),
        "auc_clean_ci95": list(clean.auc.ci95),
        "auc_pooled": {c: roc_auc(labels, np.concatenate([p[f"score_{c}"] for p in parts])) for c in conditions},
        "auc_per_fold": [roc_auc(p["labels"], p["score_clean"]) for p in parts],
    }


def slim_checkpoint(src: Path, dst: Path) -> None:
    """The checkpoint without optimizer state, weights in float16 (half of ``best.pt``, for transport)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    keep = {k: v for k, v in ckpt.items() if k not in ("optimizer", "ema")}
    keep["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(keep, dst)


def pack(out_dir: Path, pack_dir: Path, status: dict[str, int], folds: int) -> None:
    """Checkpoints, scores, logs and a summary into *pack_dir* (few files: a lease returns few)."""
    pack_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"exit_status": status, "runs": {}}
    for name, code in status.items():
        outcome = out_dir / name / "outcome.json"
        if code == 0 and outcome.is_file():
            summary["runs"][name] = json.loads(outcome.read_text())
        if code == 0 and not name.startswith("fold"):
            slim_checkpoint(out_dir / name / "best.pt", pack_dir / f"{name}.pt")
    try:
        summary["out_of_fold"] = pooled_oof(out_dir, folds)
    except (OSError, IndexError, KeyError) as exc:
        summary["out_of_fold"] = {"error": repr(exc)}
    (pack_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with tarfile.open(pack_dir / "runs.tar.gz", "w:gz") as tar:
        for path in sorted(out_dir.rglob("*")):
            if path.suffix in (".log", ".jsonl", ".json", ".npz", ".txt"):
                tar.add(path, arcname=str(path.relative_to(out_dir)))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, recipe = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(prog="python -m inference.training.campaign", description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--minutes", type=float, required=True, help="training budget of each phase-1 run")
    p.add_argument("--distill-minutes", type=float, default=0.0, help="budget of the student (0 = no student)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[20260317, 1, 2])
    p.add_argument("--split-seed", type=int, default=20260317, help="the held-out split (the shipped model's)")
    p.add_argument("--pack", type=Path, default=None)
    args = p.parse_args(argv)

    status = launch(phase_one(args.folds, args.seeds, args.split_seed), args.out_dir, args.device, args.minutes, recipe)
    teachers = [args.out_dir / n / "best.pt" for n, code in sorted(status.items()) if n.startswith("final") and code == 0]
    if args.distill_minutes > 0 and teachers:
        student = student_run(teachers, args.split_seed, seed=args.seeds[0] + 7)
        status |= launch([student], args.out_dir, args.device, args.distill_minutes, recipe)
    if args.pack is not None:
        pack(args.out_dir, args.pack, status, args.folds)
    return 0 if all(code == 0 for code in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
