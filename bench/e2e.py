"""End-to-end benchmark: C-STORE of a chest radiograph -> SR arrives at a PACS (DCMTK storescp).

Two figures, both with the bundled model and ``pneumo serve`` on its defaults (fsync on):

* latency: one radiograph at a time, time from the start of ``storescu`` to the SR file
  appearing in storescp's output folder (median, p95);
* throughput: N radiographs over 4 concurrent associations, time until all N SRs arrived
  (studies/minute; each radiograph is its own study here).

Not a test. Run: ``python bench/e2e.py --latency 20 --count 200``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import free_port, wait_for_port  # noqa: E402
from tests.gateway.serve_process import ServeProcess, write_config  # noqa: E402


def make_studies(count: int, directory: Path, name: str) -> list[Path]:
    source = pydicom.dcmread(get_testdata_file(name))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        path = directory / f"{i:05d}.dcm"
        source.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def count_srs(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.name.startswith("SR"))


def wait_for_srs(folder: Path, expected: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while count_srs(folder) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {count_srs(folder)} of {expected} SRs arrived")
        time.sleep(0.005)
    return time.perf_counter()


def storescu(port: int, files: list[Path], flags: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", *flags, "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=int, default=20, help="radiographs sent one at a time")
    parser.add_argument("--count", type=int, default=200, help="radiographs for the throughput run")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--image", default="RG1_UNCR.dcm", help="pydicom-data sample (RG1_J2KR.dcm with --flags -xv)")
    parser.add_argument("--flags", nargs="*", default=[], help="extra storescu flags")
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--model", type=Path, help="model package (default: the bundled one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pneumo-e2e-") as tmp:
        work = Path(tmp)
        pacs_dir = work / "pacs"
        pacs_dir.mkdir()
        pacs_port = free_port()
        pacs = subprocess.Popen(
            ["storescp", "--fork", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)], start_new_session=True
        )
        wait_for_port(pacs_port)
        config = write_config(
            work / "pneumo.toml", work / "var", workers=True,
            extra=(
                f"threads = {args.worker_threads}\npoll_interval = 0.2\n"
                f'[[dicom.destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
                + (f'[inference]\nmodel_dir = "{args.model.resolve()}"\n' if args.model else "")
            ),
        )
        server = ServeProcess(config, work / "serve.log").start()
        try:
            latencies = []
            for path in make_studies(args.latency, work / "latency", args.image):
                before = count_srs(pacs_dir)
                start = time.perf_counter()
                proc = storescu(server.dicom_port, [path], args.flags)
                if proc.wait(120) != 0:
                    raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "storescu failed")
                latencies.append(wait_for_srs(pacs_dir, before + 1, 120) - start)

            files = make_studies(args.count, work / "throughput", args.image)
            before = count_srs(pacs_dir)
            start = time.perf_counter()
            procs = [storescu(server.dicom_port, files[i :: args.associations], args.flags) for i in range(args.associations)]
            for proc in procs:
                if proc.wait(3600) != 0:
                    raise RuntimeError("storescu failed")
            stored = time.perf_counter()
            done = wait_for_srs(pacs_dir, before + len(files), 3600)
        finally:
            server.terminate()
            os.killpg(pacs.pid, signal.SIGTERM)
            pacs.wait(10)
        if (work / "var").exists():
            shutil.rmtree(work / "var")

    ms = sorted(x * 1e3 for x in latencies)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    minutes = (done - start) / 60
    document = {
        "benchmark": "e2e",
        "image": args.image,
        "latency_ms": {"n": len(ms), "median": statistics.median(ms), "p95": p95, "max": ms[-1]},
        "throughput": {
            "radiographs": args.count,
            "associations": args.associations,
            "ingest_seconds": stored - start,
            "all_srs_seconds": done - start,
            "studies_per_minute": args.count / minutes,
        },
    }
    print(f"latency C-STORE -> SR at PACS: median {document['latency_ms']['median']:.0f} ms, p95 {p95:.0f} ms (n={len(ms)})")
    print(f"throughput: {args.count} radiographs over {args.associations} associations -> "
          f"{document['throughput']['studies_per_minute']:.0f} studies/min (all SRs after {done - start:.1f} s)")
    print(json.dumps(document))
    if args.json:
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
