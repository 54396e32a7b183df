"""Ingest benchmark: DCMTK ``storescu`` pushes N fresh copies of the 7 MB CR chest radiograph.

Targets, each measured in the same run with the same max PDU (128 KiB) and TCP_NODELAY:

* ``pneumo``      — ``pneumo serve`` doing all its durable work (fsync, index, job, audit);
* ``storescp``    — DCMTK's storage SCP writing files (``--fork`` for several associations);
* ``pynetdicom``  — a bare pynetdicom Storage SCP receiving straight to a file;
* ``orthanc``     — Orthanc (Debian's package) as the PACS peers run it: ``SyncStorageArea`` on
  (fsync of every stored file; its SQLite index commits each instance), ``TCP_NODELAY`` (DCMTK
  reads it from the environment), ``MaximumPduLength`` 128 KiB, 4 DICOM threads (its default).

Not a test: it prints a table and a JSON document. Run: ``python bench/ingest.py --count 200``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

# Run as a script (`python bench/ingest.py`): the repository root goes on the path, for `tests`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import emit
from tests.gateway.serve_process import ServeProcess, write_config

MAX_PDU = 131072


@dataclass
class Measurement:
    target: str
    associations: int
    instances: int
    seconds: float
    megabytes: float

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds


def make_copies(count: int, directory: Path) -> list[Path]:
    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        source.SOPInstanceUID = generate_uid()
        source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        if i % 50 == 0:  # a few studies, as a PACS would send them
            source.StudyInstanceUID = generate_uid()
            source.SeriesInstanceUID = generate_uid()
        path = directory / f"{i:05d}.dcm"
        source.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def send(port: int, files: list[Path], associations: int, called: str) -> float:
    """Run *associations* storescu processes in parallel; returns wall seconds."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "--max-pdu", str(MAX_PDU), "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port), *map(str, chunk)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        for chunk in chunks
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


@contextmanager
def pneumo_target(
    work: Path, associations: int, *, durable: bool = True, processes: int = 1
) -> Iterator[tuple[int, str]]:
    data = work / "pneumo"
    # Workers off: this measures ingest alone (the e2e benchmark measures the whole loop).
    # durable=False shows what the fsyncs cost (never run a hospital like that).
    storage = "" if durable else '[storage]\nfsync = false\nsqlite_synchronous = "NORMAL"'
    config = write_config(
        work / "pneumo.toml", data,
        dicom_extra=f"max_pdu = {MAX_PDU}\nacceptor_processes = {processes}", extra=storage,
    )
    server = ServeProcess(config, work / "pneumo.log").start()
    try:
        yield server.dicom_port, "PNEUMO"
    finally:
        server.terminate()
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def storescp_target(work: Path, associations: int) -> Iterator[tuple[int, str]]:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    args = ["storescp", "--max-pdu", str(MAX_PDU), "-aet", "STORESCP", "-od", str(out)]
    if associations > 1:
        args.append("--fork")
    proc = subprocess.Popen([*args, str(port)], env={**os.environ, "TCP_NODELAY": "1"}, start_new_session=True)
    wait_for_port(port)
    try:
        yield port, "STORESCP"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(out, ignore_errors=True)


@contextmanager
def pynetdicom_target(work: Path, associations: int) -> Iterator[tuple[int, str]]:
    out = work / "pynetdicom"
    out.mkdir()
    port = free_port()
    script = Path(__file__).with_name("bare_pynetdicom_scp.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(out), str(MAX_PDU)])
    wait_for_port(port)
    try:
        yield port, "BARE"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(out, ignore_errors=True)


@contextmanager
def orthanc_target(work: Path, associations: int) -> Iterator[tuple[int, str]]:
    from tests.dicom_peers import ORTHANC_BINARY, Orthanc

    if not Path(ORTHANC_BINARY).is_file():
        raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
    options = {"SyncStorageArea": True, "MaximumPduLength": MAX_PDU, "DicomThreadsCount": 4, "StorageCompression": False}
    orthanc = Orthanc(work / "orthanc", ae_title="ORTHANC", options=options, env={"TCP_NODELAY": "1"}).start()
    try:
        yield orthanc.dicom_port, "ORTHANC"
    finally:
        orthanc.stop()
        shutil.rmtree(work / "orthanc", ignore_errors=True)


@contextmanager
def pneumo_nofsync_target(work: Path, associations: int) -> Iterator[tuple[int, str]]:
    with pneumo_target(work, associations, durable=False) as target:
        yield target


@contextmanager
def pneumo_2proc_target(work: Path, associations: int) -> Iterator[tuple[int, str]]:
    with pneumo_target(work, associations, processes=2) as target:
        yield target


TARGETS: dict[str, Callable[[Path, int], AbstractContextManager[tuple[int, str]]]] = {
    "pneumo": pneumo_target,
    "pneumo-2proc": pneumo_2proc_target,
    "pneumo-nofsync": pneumo_nofsync_target,
    "storescp": storescp_target,
    "pynetdicom": pynetdicom_target,
    "orthanc": orthanc_target,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--targets", nargs="+", default=["pneumo", "pneumo-2proc", "storescp", "pynetdicom", "orthanc"],
        choices=list(TARGETS),
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        print("storescu not found: apt-get install dcmtk", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="pneumo-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        files = make_copies(args.count, work / "input")
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        results: list[Measurement] = []
        for associations in args.associations:
            for name in args.targets:
                run_dir = work / f"{name}-{associations}"
                run_dir.mkdir()
                with TARGETS[name](run_dir, associations) as (port, called):
                    seconds = send(port, files, associations, called)
                results.append(Measurement(name, associations, len(files), seconds, megabytes))
                m = results[-1]
                print(f"{name:<11} assoc={associations} {m.per_second:7.1f} inst/s {m.mb_per_second:7.1f} MB/s", flush=True)

    print()
    peers = [peer for peer in ("storescp", "orthanc") if peer in args.targets]
    print(f"{'target':<14} {'assoc':>5} {'inst/s':>8} {'MB/s':>8}" + "".join(f" {'vs ' + p:>12}" for p in peers))
    for m in results:
        ratios = ""
        for peer in peers:
            reference = next(r for r in results if r.target == peer and r.associations == m.associations)
            ratios += f" {m.per_second / reference.per_second:>11.2f}x"
        print(f"{m.target:<14} {m.associations:>5} {m.per_second:>8.1f} {m.mb_per_second:>8.1f}{ratios}")
    document = {
        "benchmark": "ingest",
        "image": "RG1_UNCR.dcm (CR chest, 1955x1841, 7.2 MB)",
        "max_pdu": MAX_PDU,
        "results": [{**asdict(m), "per_second": m.per_second, "mb_per_second": m.mb_per_second} for m in results],
    }
    emit(document, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
