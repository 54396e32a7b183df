"""Run the benchmark suite and write one Markdown table: Pneumo against its peers, measured in the same run.

Runs, each as a subprocess of its own script (so a crash, a hang or a missing peer in one does not stop
the rest), reading the JSON document each writes with ``--json``:

* ``ingest``    — ``bench/ingest.py``: C-STOREs/s from DCMTK ``storescu`` into Pneumo (1 and 2 acceptor
  processes) against DCMTK ``storescp``, a bare pynetdicom SCP and Orthanc;
* ``inference`` — ``bench/inference.py``: the classifier's path (read, decode, preprocess, infer) against
  the bare ONNX Runtime floor (``session.run`` on a prepared tensor);
* ``e2e``       — ``bench/e2e.py``: results (SRs at the PACS) per minute against images received per
  minute in the same run, and C-STORE → SR latency against the C-STORE alone;
* ``fhir``      — ``bench/fhir.py``: FHIR reads and searches against a bare FastAPI route (needs
  PostgreSQL and ``wrk``);
* ``hl7``       — ``bench/hl7.py``: ORM orders/s with ACK against the bare MLLP floor (and the floor
  that commits each message, ``floor-db``).

Each row of the table gives the figure, the peer's figure and the ratio Pneumo / peer with the direction
that is better (for a throughput higher, for a latency lower). A benchmark (or a peer) that cannot run
shows as "not run: <why>". The header names the date, the commit, the machine (CPU, cores, RAM, OS,
Python), its load average at the start (with a warning when it was busy) and the settings.

Run: ``python bench/run_all.py`` (a full run, tens of minutes), ``--quick`` (small counts, a smoke run of
a minute or two: its figures are not comparable with a full run's), ``--only ingest,hl7``,
``--output PATH``, ``--update-docs`` (replace the block between the run_all markers in
docs/benchmarks.md). ``make bench`` runs it with ``--update-docs``.
Do not run it while tests or other benchmarks run: on a small machine they measure each other.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder would come first on the path (and bench/hl7.py, bench/fhir.py
# would shadow the `hl7` and `fhir` packages): the repository root goes there instead.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN_MARKER = "<!-- run_all:begin -->"
END_MARKER = "<!-- run_all:end -->"
POSTGRES_URL = os.environ.get("PNEUMO_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ORTHANC_BINARY = "/usr/sbin/Orthanc"  # as tests/dicom_peers.py (Debian's package)
BENCHMARKS = ("ingest", "inference", "e2e", "fhir", "hl7")


# -- rows and the table -----------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a Pneumo figure against a peer's figure from the same run.

    ``peer_value`` None with a ``peer`` means the peer did not run (``note`` says why); ``pneumo`` None
    means the benchmark did not run. Without a peer the row is an absolute figure with no ratio."""

    benchmark: str
    metric: str
    unit: str
    pneumo: float | None
    peer: str = ""
    peer_value: float | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.pneumo is None or self.peer_value is None or self.peer_value == 0:
            return None
        return self.pneumo / self.peer_value


def not_run(benchmark: str, why: str, metric: str = "all", peer: str = "") -> Row:
    return Row(benchmark, metric, "", None, peer=peer, note=f"not run: {why}")


def format_value(value: float | None, unit: str) -> str:
    """3 significant figures at most, thousands separated: ``1,234``, ``56.7``, ``8.91``, ``0.123``."""
    if value is None:
        return "–"
    magnitude = abs(value)
    if magnitude >= 100:
        text = f"{value:,.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def format_ratio(ratio: float | None) -> str:
    """Two decimals; three below 0.1, so that a server far below its floor still shows how far."""
    if ratio is None:
        return "–"
    return f"{ratio:.3f}×" if ratio < 0.1 else f"{ratio:.2f}×"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: Sequence[Row]) -> str:
    """The Markdown table; ratio = Pneumo / peer, with the direction that is better."""
    lines = [
        "| benchmark | metric | Pneumo | peer | peer figure | ratio (Pneumo / peer) | better |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.pneumo is None:  # the benchmark did not run, or (with a peer named) only that peer did not
            pneumo, peer_figure = ("–", row.note or "not run") if row.peer else (row.note or "not run", "–")
            ratio = better = "–"
        else:
            pneumo = format_value(row.pneumo, row.unit)
            if not row.peer:
                peer_figure, ratio = "–", "–"
            elif row.peer_value is None:
                peer_figure, ratio = row.note or "not run", "–"
            else:
                peer_figure = format_value(row.peer_value, row.unit)
                ratio = format_ratio(row.ratio)
            better = "higher" if row.higher_is_better else "lower"
        lines.append(
            f"| {_cell(row.benchmark)} | {_cell(row.metric)} | {_cell(pneumo)} | {_cell(row.peer or '–')} "
            f"| {_cell(peer_figure)} | {ratio} | {better} |"
        )
    return "\n".join(lines)


# -- the machine --------------------------------------------------------------------------------------


def cpu_model(cpuinfo: str) -> str:
    """The CPU's name from /proc/cpuinfo (x86: ``model name``; Arm: ``Hardware`` / ``CPU part``)."""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match:
            return re.sub(r"\s+", " ", match.group(1)).strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_gib(meminfo: str) -> float | None:
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, re.MULTILINE)
    return round(int(match.group(1)) / 1024**2, 1) if match else None


def os_name(os_release: str) -> str:
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', os_release, re.MULTILINE)
    return match.group(1) if match else platform.system()


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def busy_threshold(cores: int) -> float:
    """A 1-minute load average at or above half the cores: other work is running (tests, builds)."""
    return max(1.0, cores / 2)


def describe_machine() -> dict[str, Any]:
    cores = os.cpu_count() or 1
    load = [round(x, 2) for x in os.getloadavg()]  # busy or not by the figure the header shows
    return {
        "cpu": cpu_model(_read("/proc/cpuinfo")),
        "cores": cores,
        "memory_gib": memory_gib(_read("/proc/meminfo")),
        "os": os_name(_read("/etc/os-release")),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_at_start": load,
        "busy": load[0] >= busy_threshold(cores),
        "busy_threshold": busy_threshold(cores),
    }


def wait_for_quiet(seconds: float) -> None:
    """Wait up to *seconds* for the 1-minute load average to fall below the busy threshold (it decays slowly:
    about a minute after other work stopped)."""
    threshold = busy_threshold(os.cpu_count() or 1)
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        print(f"waiting for a quiet machine: load average {os.getloadavg()[0]:.2f} >= {threshold:g}", file=sys.stderr,
              flush=True)
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))


def machine_line(machine: dict[str, Any]) -> str:
    memory = f"{machine['memory_gib']:g} GiB RAM" if machine.get("memory_gib") else "RAM unknown"
    return (f"{machine['cpu']}, {machine['cores']} cores, {memory}, {machine['os']} (Linux {machine['kernel']}), "
            f"Python {machine['python']}")


def git_commit() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    return f"{commit} + uncommitted changes ({len(changed)} paths)" if changed else commit


# -- the benchmarks: settings, commands, figures ------------------------------------------------------


@dataclass
class Plan:
    """How one benchmark runs: its command (``--json`` is added) and rows for peers dropped beforehand."""

    name: str
    args: list[str]
    skipped: list[Row] = field(default_factory=list)
    why_not: str | None = None  # the whole benchmark cannot run


def postgres_unreachable(url: str) -> str | None:
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means: not reachable, say which
        return f"PostgreSQL not reachable at {url} ({exc.__class__.__name__})"


def plan_ingest(quick: bool, have: Callable[[str], bool]) -> Plan:
    if not have("storescu"):
        return Plan("ingest", [], why_not="storescu not found (apt-get install dcmtk)")
    targets = ["pneumo", "pneumo-2proc", "storescp", "pynetdicom", "orthanc"]
    skipped = []
    if not have("storescp"):
        targets.remove("storescp")
        skipped.append(not_run("ingest", "storescp not found (apt-get install dcmtk)", "C-STOREs/s", "DCMTK storescp"))
    if not Path(ORTHANC_BINARY).is_file():
        targets.remove("orthanc")
        skipped.append(not_run("ingest", "Orthanc not installed (apt-get install orthanc)", "C-STOREs/s", "Orthanc"))
    counts = ["--count", "20", "--associations", "1"] if quick else ["--count", "200", "--associations", "1", "4"]
    if quick:
        targets.remove("pneumo-2proc")
    return Plan("ingest", [*counts, "--targets", *targets], skipped)


def plan_inference(quick: bool, have: Callable[[str], bool]) -> Plan:
    return Plan("inference", ["--repeats", "5", "--concurrency", "4"] if quick else ["--repeats", "30", "--concurrency", "8"])


def plan_e2e(quick: bool, have: Callable[[str], bool]) -> Plan:
    missing = [tool for tool in ("storescu", "storescp") if not have(tool)]
    if missing:
        return Plan("e2e", [], why_not=f"{', '.join(missing)} not found (apt-get install dcmtk)")
    return Plan("e2e", ["--latency", "3", "--count", "10"] if quick else ["--latency", "20", "--count", "200"])


def plan_fhir(quick: bool, have: Callable[[str], bool], postgres_url: str) -> Plan:
    if not have("wrk"):
        return Plan("fhir", [], why_not="wrk not found (apt-get install wrk)")
    if why := postgres_unreachable(postgres_url):
        return Plan("fhir", [], why_not=why)
    if quick:  # its own small corpus, so that the 100k one is neither used nor re-seeded
        args = ["--seed", "--reports", "2000", "--schema", "bench_fhir_quick", "--clients", "1", "--seconds", "2",
                "--warmup", "1", "--tries", "1", "--quiet-timeout", "10", "--min-requests", "1", "--max-seconds", "5"]
    else:
        args = ["--seed", "--reports", "100000", "--clients", "1", "16", "--seconds", "10"]
    return Plan("fhir", ["--url", postgres_url, *args])


def plan_hl7(quick: bool, have: Callable[[str], bool], postgres_url: str) -> Plan:
    targets = ["floor", "pneumo"] if quick else ["floor", "floor-db", "pneumo", "pneumo-pg"]
    skipped = []
    if "pneumo-pg" in targets and (why := postgres_unreachable(postgres_url)):
        targets.remove("pneumo-pg")
        skipped.append(not_run("hl7", why, "ORM orders/s with ACK, Pneumo on PostgreSQL"))
    if quick:
        args = ["--connections", "1", "--seconds", "2", "--warmup", "0.5", "--studies", "0"]
    else:
        args = ["--connections", "1", "8", "--seconds", "10", "--warmup", "2", "--studies", "30"]
    return Plan("hl7", ["--targets", *targets, *args, "--postgres-url", postgres_url], skipped)


def _against_peers(results: list[dict[str, Any]], level: str, targets: dict[str, str], peers: dict[str, str],
                   benchmark: str, unit: str, metric: Callable[[Any, str], str]) -> list[Row]:
    """One row per (load level, Pneumo target, peer) measured at that level: ``per_second`` of the
    target against the peer's. *metric* names the row for a level and a target's label."""
    rows = []
    for n in sorted({r[level] for r in results}):
        at = {r["target"]: r for r in results if r[level] == n}
        for target, label in targets.items():
            if target not in at:
                continue
            for peer, peer_label in peers.items():
                if peer in at:
                    rows.append(Row(benchmark, metric(n, label), unit, at[target]["per_second"], peer_label,
                                    at[peer]["per_second"]))
    return rows


def rows_ingest(doc: dict[str, Any]) -> list[Row]:
    results = doc["results"]
    peers = {"storescp": "DCMTK storescp", "pynetdicom": "bare pynetdicom SCP", "orthanc": "Orthanc"}
    names = {"pneumo": "1 acceptor process", "pneumo-2proc": "2 acceptor processes"}
    return _against_peers(results, "associations", names, peers, "ingest", "inst/s",
                          lambda n, label: f"C-STOREs/s, {n} assoc., Pneumo {label}")


def rows_inference(doc: dict[str, Any]) -> list[Row]:
    floor = doc["ort_floor"]
    batch = doc["options"]["max_batch"]
    uncompressed = doc["latency_ms"]["RG1_UNCR.dcm"]["decode+preprocess+infer"]
    throughput = doc["throughput_RG1_UNCR"]
    concurrent = next(k for k in throughput if k.startswith("concurrent"))
    callers = concurrent.removeprefix("concurrent").split("_")[0]
    return [
        Row("inference", "RG1 uncompressed: decode + preprocess + infer, median", "ms", uncompressed["median"],
            "ONNX Runtime session.run, batch 1, median", floor["batch1_ms"]["median"], higher_is_better=False),
        Row("inference", "images/s, one caller", "img/s", throughput["batch1_sequential"]["images_per_s"],
            "ONNX Runtime session.run, batch 1", floor["batch1_images_per_s"]),
        Row("inference", f"images/s, {callers} callers (micro-batched)", "img/s", throughput[concurrent]["images_per_s"],
            f"ONNX Runtime session.run, batch {batch}", floor[f"batch{batch}_images_per_s"]),
    ]


def rows_e2e(doc: dict[str, Any]) -> list[Row]:
    rows = []
    latency = doc.get("latency_ms")
    if latency:
        rows.append(Row("e2e", f"C-STORE → SR at the PACS, median (n = {latency['n']})", "ms", latency["median"],
                        "the C-STORE alone (storescu start → exit), median", latency["storescu_done_median"],
                        higher_is_better=False))
        rows.append(Row("e2e", f"C-STORE → SR at the PACS, p95 (n = {latency['n']})", "ms", latency["p95"],
                        higher_is_better=False))
    throughput = doc.get("throughput")
    if throughput:
        images_per_minute = throughput["radiographs"] / throughput["ingest_seconds"] * 60
        rows.append(Row("e2e", f"results (SRs at the PACS)/min, {throughput['radiographs']} radiographs, "
                        f"{throughput['associations']} assoc.", "/min", throughput["studies_per_minute"],
                        "images received/min, same run", images_per_minute))
    return rows


def rows_fhir(doc: dict[str, Any]) -> list[Row]:
    results = doc["results"]
    rows = []
    labels = {"read": "read by id", "patient": "search by patient", "date": "search by date + _include"}
    for clients in sorted({r["clients"] for r in results}):
        at = {r["scenario"]: r for r in results if r["clients"] == clients}
        floor = at.get("floor")
        for scenario, label in labels.items():
            if scenario not in at:
                continue
            m = at[scenario]
            rows.append(Row("fhir", f"{label}, {clients} client(s), requests/s", "req/s", m["per_second"],
                            "bare FastAPI route (floor)", floor["per_second"] if floor else None,
                            note="" if floor else "not run"))
            rows.append(Row("fhir", f"{label}, {clients} client(s), p99", "ms", m["p99_ms"],
                            "bare FastAPI route (floor)", floor["p99_ms"] if floor else None, higher_is_better=False,
                            note="" if floor else "not run"))
    return rows


def rows_hl7(doc: dict[str, Any]) -> list[Row]:
    results = doc["inbound"]["results"]
    floors = {"floor": "bare MLLP floor (constant AA)", "floor-db": "MLLP floor committing each message (floor-db)"}
    labels = {"pneumo": "SQLite", "pneumo-nofsync": "SQLite, fsync off", "pneumo-pg": "PostgreSQL"}
    rows = _against_peers(results, "connections", labels, floors, "hl7", "orders/s",
                          lambda n, label: f"ORM orders/s with ACK, {n} conn., Pneumo on {label}")
    oru = doc.get("result_to_oru")
    if oru:
        rows.append(Row("hl7", f"C-STORE start → ORU at the EHR, p50 (n = {oru['studies']})", "ms",
                        oru["cstore_to_oru"]["p50_ms"], higher_is_better=False))
    return rows


def disturbed(name: str, doc: dict[str, Any] | None) -> str | None:
    """What the benchmark itself saw of other processes' CPU during its runs (bench/hl7.py and bench/fhir.py
    measure it from /proc: cores used by processes outside the benchmark), or None when it saw none."""
    if doc is None:
        return None
    checks = {"hl7": lambda d: d["inbound"]["target_checks"], "fhir": lambda d: d["targets"]}.get(name)
    if checks is None:
        return None
    try:
        quiet = checks(doc)["quiet_machine"]
    except (KeyError, TypeError):
        return None
    if quiet.get("met", True):
        return None
    value = quiet.get("value")
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "ingest": rows_ingest, "inference": rows_inference, "e2e": rows_e2e, "fhir": rows_fhir, "hl7": rows_hl7,
}


# -- running --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    command: list[str]
    rows: list[Row]
    seconds: float
    document: dict[str, Any] | None = None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_script(name: str, command: list[str], log_path: Path, timeout: float, echo: bool) -> tuple[int | None, str]:
    """Run *command* in its own process group, its output to *log_path* (and to stderr with *echo*).
    Returns (exit status, or None when it ran past *timeout*; the last lines of its output)."""
    tail: list[str] = []
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                del tail[:-40]
                if echo:
                    print(f"[{name}] {line}", end="", file=sys.stderr, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            status: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
            stop_group(proc)
        reader.join(10)
    return status, "".join(tail)


def stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGINT first (the scripts' ``finally`` blocks stop their servers), then SIGKILL to the group."""
    for sig, grace in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_benchmark(plan: Plan, work: Path, timeout: float, echo: bool) -> Outcome:
    json_path = work / f"{plan.name}.json"
    command = [sys.executable, str(ROOT / "bench" / f"{plan.name}.py"), *plan.args, "--json", str(json_path)]
    if plan.why_not:
        return Outcome(plan.name, command, [not_run(plan.name, plan.why_not)], 0.0)
    print(f"[{plan.name}] {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    status, output = run_script(plan.name, command, work / f"{plan.name}.log", timeout, echo)
    seconds = time.monotonic() - started
    if status is None:
        rows = [not_run(plan.name, f"timed out after {timeout:.0f} s")]
        return Outcome(plan.name, command, [*rows, *plan.skipped], seconds)
    if status != 0 or not json_path.is_file():
        why = f"exit {status}: {last_line(output)}" if status else "no JSON document written"
        return Outcome(plan.name, command, [not_run(plan.name, why), *plan.skipped], seconds)
    document = json.loads(json_path.read_text())
    try:
        rows = ROWS[plan.name](document)
    except (KeyError, StopIteration, TypeError, ZeroDivisionError) as exc:
        rows = [not_run(plan.name, f"its JSON document has no figure where expected ({exc.__class__.__name__}: {exc})")]
    if not rows:
        rows = [not_run(plan.name, "its JSON document holds no figures")]
    return Outcome(plan.name, command, [*rows, *plan.skipped], seconds, document)


def make_plans(selected: Sequence[str], quick: bool, postgres_url: str, have: Callable[[str], bool]) -> list[Plan]:
    builders: dict[str, Callable[[], Plan]] = {
        "ingest": lambda: plan_ingest(quick, have),
        "inference": lambda: plan_inference(quick, have),
        "e2e": lambda: plan_e2e(quick, have),
        "fhir": lambda: plan_fhir(quick, have, postgres_url),
        "hl7": lambda: plan_hl7(quick, have, postgres_url),
    }
    return [builders[name]() for name in BENCHMARKS if name in selected]


# -- the report -------------------------------------------------------------------------------------------


def render_report(outcomes: Sequence[Outcome], machine: dict[str, Any], *, started: dt.datetime, commit: str,
                  quick: bool, seconds: float, load_at_end: Sequence[float]) -> str:
    load = " / ".join(f"{x:.2f}" for x in machine["load_at_start"])
    lines = [
        f"Run of {started:%Y-%m-%d %H:%M} UTC, commit {commit}, "
        f"{'**quick** (`--quick`: small counts, a smoke run; not comparable with a full run)' if quick else 'full'}; "
        f"took {seconds / 60:.1f} min.",
        "",
        f"Machine: {machine_line(machine)}.",
        "",
        f"Load average (1 / 5 / 15 min) at the start {load}, at the end "
        f"{' / '.join(f'{x:.2f}' for x in load_at_end)} (the benchmarks' own load)."
        + (f" Speed probe at the start (bench/hl7.py's fixed pure-Python loop, lower is faster): "
           f"{machine['speed_probe_ms']} ms." if "speed_probe_ms" in machine else ""),
    ]
    if machine["busy"]:
        lines += ["", f"**Warning: the machine was busy at the start** (1-minute load average "
                  f"{machine['load_at_start'][0]:.2f} ≥ {machine['busy_threshold']:g}): other work competed for the CPU, "
                  "so these figures understate both Pneumo and its peers unevenly. Measure again on a quiet machine."]
    others = {o.name: why for o in outcomes if (why := disturbed(o.name, o.document))}
    if others:
        lines += ["", "**Warning: other processes used the CPU during some runs** (cores, as the benchmark measured "
                  "them): " + "; ".join(f"{name}: {why}" for name, why in others.items()) + "."]
    lines += ["", "Every peer was measured in the same run as Pneumo; ratio = Pneumo / peer, and the last column says "
              "which direction is better.", "", render_table([row for o in outcomes for row in o.rows]), "",
              "Commands (each also given `--json`):", ""]
    for outcome in outcomes:
        if outcome.document is None and not outcome.seconds:
            lines.append(f"* {outcome.name}: not run")
            continue
        args = " ".join(outcome.command[1:-2]).replace(str(ROOT) + "/", "")
        lines.append(f"* {outcome.name}: `python {args}`, {outcome.seconds:.0f} s")
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """*text* with what lies between the run_all markers replaced by *block*; the rest is kept byte for byte."""
    begin, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if begin < 0 or end < 0 or end < begin or text.count(BEGIN_MARKER) != 1 or text.count(END_MARKER) != 1:
        raise ValueError(f"expected one {BEGIN_MARKER} followed by one {END_MARKER}")
    head = text[: begin + len(BEGIN_MARKER)]
    return f"{head}\n{block.strip()}\n{text[end:]}"


# -- main -------------------------------------------------------------------------------------------------


def parse_only(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(BENCHMARKS)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run of a minute or two")
    parser.add_argument("--only", type=parse_only, default=list(BENCHMARKS), metavar="NAMES",
                        help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, help="write the report here (default: stdout)")
    parser.add_argument("--update-docs", action="store_true",
                        help=f"replace the block between {BEGIN_MARKER} and {END_MARKER} in docs/benchmarks.md")
    parser.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the rows, the machine and each benchmark's document here")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep each benchmark's JSON document and output log here")
    parser.add_argument("--postgres-url", default=POSTGRES_URL, help="PostgreSQL for the FHIR and HL7 benchmarks")
    parser.add_argument("--timeout", type=float, help="seconds per benchmark (default 300 with --quick, else 3600)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the benchmarks' own output to stderr")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the load average to fall below the busy threshold")
    args = parser.parse_args(argv)
    if args.update_docs and args.quick:
        parser.error("--update-docs keeps the latest *full* run: not with --quick")
    if args.update_docs and not args.docs.is_file():
        parser.error(f"{args.docs} not found")
    if args.update_docs:
        try:  # the markers are there: fail now, not after an hour of benchmarks
            replace_block(args.docs.read_text(), "")
        except ValueError as exc:
            parser.error(f"{args.docs}: {exc}")
    timeout = args.timeout or (300.0 if args.quick else 3600.0)

    wait_for_quiet(args.wait_quiet)
    started = dt.datetime.now(dt.UTC)
    machine = describe_machine()
    if machine["busy"]:
        print(f"WARNING: load average {machine['load_at_start'][0]:.2f} >= {machine['busy_threshold']:g}: "
              "the machine is busy; figures will be noted as such", file=sys.stderr, flush=True)
    from bench.hl7 import speed_probe

    machine["speed_probe_ms"] = speed_probe()
    commit = git_commit()
    clock = time.monotonic()

    def have(tool: str) -> bool:
        return shutil.which(tool) is not None

    plans = make_plans(args.only, args.quick, args.postgres_url, have)
    with tempfile.TemporaryDirectory(prefix="pneumo-run-all-") as tmp:
        work = Path(tmp)
        outcomes = [run_benchmark(plan, work, timeout, echo=not args.quiet) for plan in plans]
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for kept in [*work.glob("*.json"), *work.glob("*.log")]:
                shutil.copy(kept, args.keep / kept.name)

    report = render_report(outcomes, machine, started=started, commit=commit, quick=args.quick,
                           seconds=time.monotonic() - clock, load_at_end=os.getloadavg())
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(report, end="")
    if args.update_docs:
        args.docs.write_text(replace_block(args.docs.read_text(), report))  # read again: others may have edited it
        print(f"updated {args.docs}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "when": started.isoformat(timespec="seconds"), "commit": commit, "quick": args.quick, "machine": machine,
            "benchmarks": [{"name": o.name, "command": o.command, "seconds": round(o.seconds, 1),
                            "rows": [asdict(r) for r in o.rows], "document": o.document} for o in outcomes],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
