"""Delivery benchmark: what one report costs to C-STORE to a PACS, by how we send it.

Sends our real SR (``build_ai_sr`` of RG1) N times with :func:`dicom_node.storage_scu.send_instance`
to DCMTK ``storescp`` (``--fork``), run twice: with DCMTK's default (Nagle's algorithm on, as the
e2e benchmark's PACS and many installed DCMTK-based peers) and with ``TCP_NODELAY=1`` (as
Orthanc and dcm4chee behave). For each PACS, three ways of sending:

* ``one-association``: an association per object (``delivery.association_idle_seconds = 0``);
* ``reused``: the pool keeps the association open between objects (the default, 5 s);
* ``no-quick-ack``: one association per object, and our reads without quick ACKs
  (pynetdicom's own 4 KiB reads), i.e. the Storage SCU as it was before the ``PduReader``.

Reports wall time and this process's CPU per object (median over N, after a warm-up).

Not a test. Run: ``python bench/delivery.py --count 40``.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import structlog
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import free_port, wait_for_port  # noqa: E402
from bench.report import emit  # noqa: E402
from conf.settings import DicomDestination  # noqa: E402
from dicom_node import storage_scu  # noqa: E402
from dicom_node.associations import AssociationPool  # noqa: E402
from dicom_node.sr import build_ai_sr  # noqa: E402
from tests.conftest import sample_ai_result  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def storescp(out: Path, nodelay: bool) -> Iterator[int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    proc = subprocess.Popen(
        ["storescp", "--fork", "-aet", "PACS", "-od", str(out), str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


@contextmanager
def without_quick_ack() -> Iterator[None]:
    """Our SCU as before the PduReader: TCP_NODELAY only, pynetdicom's own reads."""
    original = storage_scu.low_latency_tcp

    def nodelay_only(event: Any) -> None:
        sock = event.assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    storage_scu.low_latency_tcp = nodelay_only  # type: ignore[assignment]
    try:
        yield
    finally:
        storage_scu.low_latency_tcp = original  # type: ignore[assignment]


def measure(send: Callable[[], object], count: int) -> dict[str, float]:
    for _ in range(3):
        send()
    walls, cpus = [], []
    for _ in range(count):
        cpu, wall = cpu_seconds(), time.perf_counter()
        send()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    return {"wall_ms": statistics.median(walls) * 1e3, "cpu_ms": statistics.mean(cpus) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings only

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pneumo-delivery-") as tmp:
        work = Path(tmp)
        source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
        sr = work / "sr.dcm"
        build_ai_sr(source, sample_ai_result()).save_as(sr, enforce_file_format=True)
        for nodelay in (False, True):
            out = work / f"pacs-{nodelay}"
            out.mkdir()
            with storescp(out, nodelay) as port:
                destination = DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
                pool = AssociationPool(30.0)
                ways: dict[str, Callable[[], object]] = {
                    "one-association": partial(storage_scu.send_instance, sr, destination, "PNEUMO", 30),
                    "reused": partial(storage_scu.send_instance, sr, destination, "PNEUMO", 30, pool),
                }
                for way, send in ways.items():
                    results.append({"pacs_tcp_nodelay": nodelay, "way": way, **measure(send, args.count)})
                pool.close()
                with without_quick_ack():
                    results.append({"pacs_tcp_nodelay": nodelay, "way": "no-quick-ack",
                                    **measure(ways["one-association"], args.count)})
    print(f"{'PACS':<22} {'how':<17} {'wall ms':>8} {'CPU ms':>7}")
    for r in results:
        pacs = "storescp TCP_NODELAY=1" if r["pacs_tcp_nodelay"] else "storescp (Nagle on)"
        print(f"{pacs:<22} {r['way']:<17} {r['wall_ms']:>8.1f} {r['cpu_ms']:>7.1f}")
    document = {"benchmark": "delivery", "object": "TID 1500 SR of RG1", "count": args.count, "results": results}
    emit(document, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
