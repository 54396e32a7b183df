"""End-to-end benchmark: C-STORE of a chest radiograph -> SR arrives at a PACS (DCMTK storescp).

Two figures, both with the bundled model and ``pneumo serve`` on its defaults (fsync on):

* latency: one radiograph at a time, time from the start of ``storescu`` to the SR file
  appearing in storescp's output folder (median, p95);
* throughput: N radiographs over 4 concurrent associations, time until all N SRs arrived
  (studies/minute; each radiograph is its own study here); also when all N summary images (SC)
  arrived.

With ``--count-work [N]`` (default N=20) a separate, instrumented gateway run shows the work done
per result: N radiographs (each its own study) go through ``pneumo serve`` to the PACS, the bench
waits for all N SRs and N SCs, stops the gateway with SIGTERM and sums what
``bench/work_counter/sitecustomize.py`` counted in each gateway process (pydicom parses of each
stored/received file, full vs header-only, and pixel decodes). No product code is changed: the
counter is loaded through ``PYTHONPATH`` only for that run; the timing runs are not instrumented.

The gateway runs the code of the tree this script lies in (its root goes first on ``PYTHONPATH``
and is the working directory), so a copy of ``bench/`` in a git worktree measures that worktree.

Not a test. Run: ``python bench/e2e.py --latency 20 --count 200 --count-work 20``
(``--latency 0 --count 0 --count-work`` for the work count alone).
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hl7 import proc_cpu_seconds, speed_probe  # noqa: E402
from bench.ingest import free_port, wait_for_port  # noqa: E402
from bench.report import emit  # noqa: E402
from conf.settings import ResultsSettings, WorkerSettings  # noqa: E402
from tests.gateway.serve_process import ServeProcess, write_config  # noqa: E402

WORK_COUNTER = ROOT / "bench" / "work_counter"


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


def count_scs(folder: Path) -> int:
    """Summary images at the PACS: storescp names files <modality>.<uid>; only SRs and SCs arrive."""
    return sum(1 for p in folder.iterdir() if not p.name.startswith("SR") and not p.name.startswith("."))


def wait_for_srs(folder: Path, expected: int, timeout: float, counter=count_srs, what: str = "SRs") -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while counter(folder) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {counter(folder)} of {expected} {what} arrived")
        time.sleep(0.005)
    return time.perf_counter()


def child_env(count_dir: Path | None, data_dir: Path) -> dict[str, str]:
    """Environment for ``pneumo serve``: this tree's code first; the work counter when counting."""
    env = {k: v for k, v in os.environ.items() if k not in ("PNEUMO_BENCH_COUNT_DIR", "PNEUMO_BENCH_DATA_DIR")}
    paths = [str(ROOT)]
    if count_dir is not None:
        paths.insert(0, str(WORK_COUNTER))
        env["PNEUMO_BENCH_COUNT_DIR"] = str(count_dir)
        env["PNEUMO_BENCH_DATA_DIR"] = str(data_dir)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def code_under_test(env: dict[str, str]) -> str:
    """Where the gateway child imports ``gateway`` from (same interpreter, env and working dir)."""
    env = {k: v for k, v in env.items() if k != "PNEUMO_BENCH_COUNT_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", "import gateway, inference.preprocess as p; print(gateway.__file__, p.__file__)"],
        capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    )
    return out.stdout.strip()


@contextmanager
def gateway(
    work: Path, name: str, pacs_port: int, args: argparse.Namespace, count_dir: Path | None = None
) -> Iterator[ServeProcess]:
    """``pneumo serve`` (workers on, delivering to the PACS) with its own data dir; SIGTERM at the end."""
    data_dir = work / f"{name}-var"
    config = write_config(
        work / f"{name}.toml", data_dir, workers=True, dicom_extra=f"acceptor_processes = {args.acceptor_processes}",
        extra=(
            f"threads = {args.worker_threads}\nprocesses = {args.worker_processes}\npoll_interval = 0.2\n"
            f'[[dicom.destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
            + (f'[inference]\nmodel_dir = "{args.model.resolve()}"\n' if args.model else "")
        ),
    )
    env = child_env(count_dir, data_dir)
    print(f"[{name}] gateway code: {code_under_test(env)}", flush=True)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # ServeProcess copies os.environ
    try:
        server = ServeProcess(config, work / f"{name}-serve.log").start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            rc = server.terminate(60)
            if rc != 0:
                print(f"[{name}] pneumo serve exited with {rc} after SIGTERM", file=sys.stderr)
        shutil.rmtree(data_dir, ignore_errors=True)


def sop_uids(paths: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID) for p in paths]


def send_all(port: int, files: list[Path], associations: int, flags: list[str]) -> None:
    procs = [storescu(port, files[i::associations], flags) for i in range(min(associations, len(files)))]
    for proc in procs:
        if proc.wait(3600) != 0:
            raise RuntimeError(proc.stderr.read().decode()[-2000:] if proc.stderr else "storescu failed")


def summarize_work(count_dir: Path, sources: list[str]) -> dict[str, Any]:
    """Sum the per-process counter files; figures per source image (= per result)."""
    files = sorted(count_dir.glob("counts-*.json"))
    if not files:
        raise RuntimeError(f"no counter files in {count_dir}: was the work counter loaded?")
    docs = [json.loads(f.read_text()) for f in files]
    n = len(sources)
    wanted = set(sources)
    per_source = {uid: {"full": 0, "header": 0, "decode": 0, "decoder_calls": 0} for uid in sources}
    where: dict[str, int] = {}
    totals: dict[str, dict[str, float]] = {"parses": {}, "decodes": {}, "decoder_calls": {}, "entry_points": {}, "seconds": {}}
    for doc in docs:
        for table in totals:
            for key, value in doc.get(table, {}).items():
                totals[table][key] = totals[table].get(key, 0) + value
        for uid, row in doc.get("per_instance", {}).items():
            if uid not in wanted:
                continue
            for key in per_source[uid]:
                per_source[uid][key] += row.get(key, 0)
            for key, value in row.get("where", {}).items():
                where[key] = where.get(key, 0) + value

    def per_result(value: float) -> float:
        return round(value / n, 3)

    def spread(key: str) -> list[int]:
        values = [row[key] for row in per_source.values()]
        return [min(values), max(values)]

    def generated(kind: str) -> dict[str, float]:
        parses = totals["parses"]
        return {
            "full_parses": per_result(sum(v for k, v in parses.items() if k.split("/")[1] == kind and k.endswith("/full"))),
            "header_parses": per_result(sum(v for k, v in parses.items() if k.split("/")[1] == kind and k.endswith("/header"))),
            "decodes": per_result(totals["decodes"].get(kind, 0)),
        }

    seconds = totals["seconds"]
    full = sum(r["full"] for r in per_source.values())
    header = sum(r["header"] for r in per_source.values())
    return {
        "results": n,
        "processes": len(docs),
        "gateway_modules": sorted({str(d.get("modules", {}).get("gateway")) for d in docs}),
        "hooks": sorted({h for d in docs for h in d.get("hooks", [])}),
        "source_per_result": {
            "parses": per_result(full + header),
            "full_parses": per_result(full),
            "header_parses": per_result(header),
            "decodes": per_result(sum(r["decode"] for r in per_source.values())),
            "decoder_calls": per_result(sum(r["decoder_calls"] for r in per_source.values())),
            "parses_by_place": {k: per_result(v) for k, v in sorted(where.items())},
            "min_max_over_images": {k: spread(k) for k in ("full", "header", "decode")},
            "parse_seconds": round(sum(v for k, v in seconds.items() if k.startswith("parse/") and "/source/" in k) / n, 4),
            "decode_seconds": round(seconds.get("decode/source", 0) / n, 4),
        },
        "sr_per_result": generated("sr"),
        "sc_per_result": generated("sc"),
        "totals": totals,
    }


def count_work(work: Path, pacs_dir: Path, pacs_port: int, args: argparse.Namespace) -> dict[str, Any]:
    count_dir = work / "counts"
    count_dir.mkdir()
    files = make_studies(args.count_work, work / "count-work", args.image)
    uids = sop_uids(files)
    srs, scs = count_srs(pacs_dir), count_scs(pacs_dir)
    with gateway(work, "count-work", pacs_port, args, count_dir) as server:
        start = time.perf_counter()
        send_all(server.dicom_port, files, args.associations, args.flags)
        sr_done = wait_for_srs(pacs_dir, srs + len(files), 3600)
        sc_done = wait_for_srs(pacs_dir, scs + len(files), 3600, count_scs, "summary images")
    work_doc = summarize_work(count_dir, uids)
    work_doc["all_srs_seconds"] = round(sr_done - start, 3)
    work_doc["all_scs_seconds"] = round(sc_done - start, 3)
    return work_doc


def print_work(w: dict[str, Any]) -> None:
    s = w["source_per_result"]
    print(f"work per result ({w['results']} radiographs, each its own study; counted in {w['processes']} gateway process(es)):")
    print(f"  source image: parsed {s['parses']:g} times (full {s['full_parses']:g}, header-only {s['header_parses']:g}), "
          f"pixel data decoded {s['decodes']:g} times (decoder runs {s['decoder_calls']:g})")
    print("    parses by place/mode: " + ", ".join(f"{k} {v:g}" for k, v in s["parses_by_place"].items()))
    print("    min/max over images: " + ", ".join(f"{k} {a}-{b}" for k, (a, b) in s["min_max_over_images"].items()))
    print(f"    time per result: parsing {s['parse_seconds'] * 1e3:.1f} ms, decoding {s['decode_seconds'] * 1e3:.1f} ms")
    for kind in ("sr", "sc"):
        g = w[f"{kind}_per_result"]
        print(f"  generated {kind.upper()}: full parses {g['full_parses']:g}, header parses {g['header_parses']:g}, "
              f"decodes {g['decodes']:g}")
    other = {k: v for k, v in w["totals"]["parses"].items() if k.split("/")[1] not in ("source", "sr", "sc")}
    if other:
        print(f"  other parses (totals): {other}")
    print(f"  all SRs after {w['all_srs_seconds']:.1f} s, all SCs after {w['all_scs_seconds']:.1f} s; "
          f"gateway code: {', '.join(w['gateway_modules'])}")


def storescu(port: int, files: list[Path], flags: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", *flags, "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def gateway_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pneumo serve`` and its live children (worker and acceptor processes)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return proc_cpu_seconds(pid) + sum(proc_cpu_seconds(int(child)) for child in out.stdout.split())


def timing(work: Path, pacs_dir: Path, pacs_port: int, args: argparse.Namespace) -> dict[str, Any]:
    """The latency and throughput runs, on one gateway without the work counter."""
    document: dict[str, Any] = {}
    with gateway(work, "timing", pacs_port, args) as server:
        latencies, stored_after = [], []
        for path in make_studies(args.latency, work / "latency", args.image):
            before = count_srs(pacs_dir)
            start = time.perf_counter()
            proc = storescu(server.dicom_port, [path], args.flags)
            if proc.wait(120) != 0:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "storescu failed")
            stored_after.append(time.perf_counter() - start)
            latencies.append(wait_for_srs(pacs_dir, before + 1, 120) - start)

        if args.count:
            files = make_studies(args.count, work / "throughput", args.image)
            # the latency run's summary images trail its SRs: let them land first
            wait_for_srs(pacs_dir, count_srs(pacs_dir), 600, count_scs, "summary images")
            before, before_sc = count_srs(pacs_dir), count_scs(pacs_dir)
            assert server.proc is not None
            cpu_before = gateway_cpu_seconds(server.proc.pid)
            start = time.perf_counter()
            send_all(server.dicom_port, files, args.associations, args.flags)
            stored = time.perf_counter()
            done = wait_for_srs(pacs_dir, before + len(files), 3600)
            sc_done = wait_for_srs(pacs_dir, before_sc + len(files), 3600, count_scs, "summary images")
            # the last studies' results (after study_stable_seconds) and FHIR publications, counted too
            time.sleep(ResultsSettings().study_stable_seconds + 3.0)
            cpu = gateway_cpu_seconds(server.proc.pid) - cpu_before

    if latencies:
        ms = sorted(x * 1e3 for x in latencies)
        p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
        stored_ms = statistics.median(stored_after) * 1e3
        document["latency_ms"] = {"n": len(ms), "median": statistics.median(ms), "p95": p95, "max": ms[-1],
                                  "storescu_done_median": stored_ms}
        print(f"latency C-STORE -> SR at PACS: median {statistics.median(ms):.0f} ms, p95 {p95:.0f} ms (n={len(ms)}); "
              f"storescu itself (start to exit): median {stored_ms:.0f} ms")
    if args.count:
        throughput = document["throughput"] = {
            "radiographs": args.count,
            "associations": args.associations,
            "ingest_seconds": stored - start,
            "all_srs_seconds": done - start,
            "studies_per_minute": args.count / ((done - start) / 60),
            "all_scs_seconds": sc_done - start,
            "studies_per_minute_with_sc": args.count / ((sc_done - start) / 60),
            "results_vs_ingest": (done - start) and (stored - start) / (done - start),
            "gateway_cpu_ms_per_radiograph": cpu * 1e3 / args.count,
        }
        print(f"throughput: {args.count} radiographs over {args.associations} associations -> "
              f"{throughput['studies_per_minute']:.0f} studies/min (all SRs after {done - start:.1f} s; "
              f"all SCs after {sc_done - start:.1f} s = {throughput['studies_per_minute_with_sc']:.0f}/min); "
              f"ingest done after {stored - start:.1f} s: results/ingest {throughput['results_vs_ingest']:.2f}x; "
              f"gateway CPU {throughput['gateway_cpu_ms_per_radiograph']:.0f} ms per radiograph")
    return document


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=int, default=20, help="radiographs sent one at a time")
    parser.add_argument("--count", type=int, default=200, help="radiographs for the throughput run")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--image", default="RG1_UNCR.dcm", help="pydicom-data sample (RG1_J2KR.dcm with --flags -xv)")
    parser.add_argument("--flags", nargs="*", default=[], help="extra storescu flags")
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--worker-processes", type=int, default=WorkerSettings().processes,
                        help="worker.processes of the gateway (0: workers as threads of pneumo serve)")
    parser.add_argument("--acceptor-processes", type=int, default=1, help="dicom.acceptor_processes of the gateway")
    parser.add_argument("--model", type=Path, help="model package (default: the bundled one)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the gateway logs (and work counter files) here")
    parser.add_argument("--count-work", type=int, nargs="?", const=20, default=0, metavar="N",
                        help="also count parses/decodes per result over N radiographs (default 20) in an instrumented run")
    args = parser.parse_args()
    if args.model:
        args.model = args.model.resolve()
    if args.json:
        args.json = args.json.resolve()
    if args.keep_logs:
        args.keep_logs = args.keep_logs.resolve()
    os.chdir(ROOT)  # ``python -m`` puts the working directory first on the child's sys.path

    document: dict[str, Any] = {"benchmark": "e2e", "image": args.image, "worker_processes": args.worker_processes,
                                "speed_probe_ms_at_start": speed_probe()}
    with tempfile.TemporaryDirectory(prefix="pneumo-e2e-") as tmp:
        work = Path(tmp)
        pacs_dir = work / "pacs"
        pacs_dir.mkdir()
        pacs_port = free_port()
        pacs = subprocess.Popen(
            ["storescp", "--fork", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)], start_new_session=True
        )
        try:
            wait_for_port(pacs_port)
            if args.latency or args.count:
                document.update(timing(work, pacs_dir, pacs_port, args))
            if args.count_work:
                document["work"] = count_work(work, pacs_dir, pacs_port, args)
                print_work(document["work"])
        finally:
            os.killpg(pacs.pid, signal.SIGTERM)
            pacs.wait(10)
            if args.keep_logs:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for kept in [*work.glob("*-serve.log"), *work.glob("counts/counts-*.json")]:
                    shutil.copy(kept, args.keep_logs / kept.name)

    document["speed_probe_ms_at_end"] = speed_probe()
    print(f"speed probe (lower is faster): {document['speed_probe_ms_at_start']} ms at start, "
          f"{document['speed_probe_ms_at_end']} ms at end")
    emit(document, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
