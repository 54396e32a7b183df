"""bench/run_all.py: the table, the ratios' direction, the docs block, the machine, the figures taken from each
benchmark's JSON document, and one real quick run of the cheapest benchmark as a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import run_all
from bench.run_all import Plan, Row

ROOT = Path(__file__).resolve().parents[2]


# -- figures and ratios ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "text"), [(None, "–"), (0.0126, "0.013×"), (0.099, "0.099×"), (0.1, "0.10×"), (1.234, "1.23×"), (29.59, "29.59×")]
)
def test_format_ratio(ratio: float | None, text: str) -> None:
    assert run_all.format_ratio(ratio) == text


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (None, "ms", "–"),
        (0.12345, "ms", "0.123 ms"),
        (8.914, "ms", "8.91 ms"),
        (56.74, "img/s", "56.7 img/s"),
        (1234.4, "orders/s", "1,234 orders/s"),
        (27490.2, "", "27,490"),
    ],
)
def test_format_value(value: float | None, unit: str, text: str) -> None:
    assert run_all.format_value(value, unit) == text


@pytest.mark.parametrize(
    ("row", "ratio", "better"),
    [
        # a throughput: higher is better, 0.50× means half the peer's
        (Row("ingest", "C-STOREs/s", "inst/s", 30.0, "DCMTK storescp", 60.0), "0.50×", "higher"),
        # a latency: lower is better, 2.00× means twice the peer's time
        (Row("inference", "median", "ms", 20.0, "ONNX Runtime", 10.0, higher_is_better=False), "2.00×", "lower"),
        # an absolute figure: no peer, no ratio, still a direction
        (Row("e2e", "p95", "ms", 400.0, higher_is_better=False), "–", "lower"),
        # a peer that did not run: its cell says why
        (Row("fhir", "read", "req/s", 200.0, "bare FastAPI route (floor)", None, note="not run"), "–", "higher"),
        # a peer measured at zero: no division
        (Row("hl7", "orders/s", "orders/s", 5.0, "floor", 0.0), "–", "higher"),
    ],
)
def test_ratio_and_direction(row: Row, ratio: str, better: str) -> None:
    line = run_all.render_table([row]).splitlines()[2]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[5] == ratio
    assert cells[6] == better
    expected = {"0.50×": 0.5, "2.00×": 2.0}.get(ratio)
    assert row.ratio == expected


def test_render_table_not_run_and_escaping() -> None:
    rows = [run_all.not_run("fhir", "wrk not found (apt-get install wrk)"),
            run_all.not_run("ingest", "Orthanc not installed", "C-STOREs/s", "Orthanc"),
            Row("hl7", "a | b", "ms", 1.0, "peer", 2.0)]
    lines = run_all.render_table(rows).splitlines()
    assert lines[0] == "| benchmark | metric | Pneumo | peer | peer figure | ratio (Pneumo / peer) | better |"
    assert lines[2] == "| fhir | all | not run: wrk not found (apt-get install wrk) | – | – | – | – |"
    assert lines[3] == "| ingest | C-STOREs/s | – | Orthanc | not run: Orthanc not installed | – | – |"
    assert "a \\| b" in lines[4]  # a pipe in a cell does not split the row
    assert all(line.count("|") - line.count("\\|") == 8 for line in lines)


# -- the docs block ---------------------------------------------------------------------------------------

B, E = run_all.BEGIN_MARKER, run_all.END_MARKER


@pytest.mark.parametrize(
    ("text", "block", "expected"),
    [
        (f"# T\n\nintro\n{B}\nold\ntable\n{E}\nrest\n", "new\n", f"# T\n\nintro\n{B}\nnew\n{E}\nrest\n"),
        (f"{B}{E}", "x", f"{B}\nx\n{E}"),
        (f"a\n{B}\n{E}\nb", "\n\nx\n\n", f"a\n{B}\nx\n{E}\nb"),
    ],
)
def test_replace_block(text: str, block: str, expected: str) -> None:
    assert run_all.replace_block(text, block) == expected
    assert run_all.replace_block(expected, block) == expected  # idempotent


@pytest.mark.parametrize(
    "text",
    ["no markers", f"only {B}", f"only {E}", f"{E} reversed {B}", f"{B} {B} twice {E}", f"{B} {E} {E}"],
)
def test_replace_block_refuses_bad_markers(text: str) -> None:
    with pytest.raises(ValueError):
        run_all.replace_block(text, "x")


def test_docs_hold_one_block_and_keep_the_rest() -> None:
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    replaced = run_all.replace_block(docs, "TABLE")
    before, after = docs.split(B)[0], docs.split(E)[1]
    assert replaced == f"{before}{B}\nTABLE\n{E}{after}"
    assert "## Latest full run" in before


def test_update_docs_refused_with_quick_or_without_markers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--quick", "--update-docs"])
    assert "not with --quick" in capsys.readouterr().err
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# no markers\n")
    with pytest.raises(SystemExit):  # before any benchmark runs
        run_all.main(["--update-docs", "--docs", str(docs), "--only", "inference"])
    assert "expected one <!-- run_all:begin -->" in capsys.readouterr().err
    assert docs.read_text() == "# no markers\n"


# -- the machine --------------------------------------------------------------------------------------------

X86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)   Gold 6338 CPU @ 2.00GHz\nflags\t\t: fpu\n"
ARM = "processor\t: 0\nBogoMIPS\t: 48.00\nCPU part\t: 0xd0c\n\nHardware\t: BCM2835\n"


@pytest.mark.parametrize(
    ("cpuinfo", "model"),
    [(X86, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"), (X86 + X86, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"),
     (ARM, "BCM2835")],
)
def test_cpu_model(cpuinfo: str, model: str) -> None:
    assert run_all.cpu_model(cpuinfo) == model


@pytest.mark.parametrize(
    ("meminfo", "gib"),
    [("MemTotal:       24641584 kB\nMemFree: 1 kB\n", 23.5), ("MemTotal: 1048576 kB\n", 1.0), ("", None)],
)
def test_memory_gib(meminfo: str, gib: float | None) -> None:
    assert run_all.memory_gib(meminfo) == gib


@pytest.mark.parametrize(
    ("release", "name"),
    [('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n', "Debian GNU/Linux 12 (bookworm)"),
     ("NAME=Alpine\nPRETTY_NAME=Alpine Linux v3.20\n", "Alpine Linux v3.20")],
)
def test_os_name(release: str, name: str) -> None:
    assert run_all.os_name(release) == name


@pytest.mark.parametrize(("cores", "threshold"), [(1, 1.0), (2, 1.0), (4, 2.0), (16, 8.0)])
def test_busy_threshold(cores: int, threshold: float) -> None:
    assert run_all.busy_threshold(cores) == threshold


def test_describe_machine_here() -> None:
    machine = run_all.describe_machine()
    assert machine["cores"] >= 1 and machine["cpu"] and machine["python"].startswith("3.")
    assert len(machine["load_at_start"]) == 3
    assert machine["busy"] == (machine["load_at_start"][0] >= machine["busy_threshold"])
    line = run_all.machine_line(machine)
    assert f"{machine['cores']} cores" in line and f"Python {machine['python']}" in line


def _report(machine: dict[str, Any]) -> str:
    import datetime as dt

    outcome = run_all.Outcome("hl7", [sys.executable, "bench/hl7.py", "--seconds", "2", "--json", "x.json"],
                              [Row("hl7", "orders/s", "orders/s", 100.0, "floor", 1000.0)], 12.0, {})
    return run_all.render_report([outcome], machine, started=dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.UTC),
                                 commit="abc1234", quick=False, seconds=60.0, load_at_end=(0.5, 0.4, 0.3))


@pytest.mark.parametrize(("load", "warned"), [(0.2, False), (1.7, True)])
def test_report_header_warns_when_busy(load: float, warned: bool) -> None:
    machine = {"cpu": "Some CPU", "cores": 2, "memory_gib": 23.5, "os": "Debian", "kernel": "6.1", "python": "3.11.7",
               "load_at_start": [load, 0.1, 0.1], "busy": load >= 1.0, "busy_threshold": 1.0, "speed_probe_ms": 9.8}
    report = _report(machine)
    assert report.startswith("Run of 2026-12-01 03:00 UTC, commit abc1234, full")
    assert "Some CPU, 2 cores, 23.5 GiB RAM, Debian (Linux 6.1), Python 3.11.7" in report
    assert "9.8 ms" in report
    assert ("Warning: the machine was busy" in report) is warned
    assert "Warning: other processes used the CPU" not in report
    assert "* hl7: `python bench/hl7.py --seconds 2`, 12 s" in report
    assert "| hl7 | orders/s | 100 orders/s | floor | 1,000 orders/s | 0.10× | higher |" in report


@pytest.mark.parametrize(
    ("name", "doc", "why"),
    [
        ("hl7", {"inbound": {"target_checks": {"quiet_machine": {"value": ["floor/1: 0.9", "pneumo/1: 1.04"], "met": False}}}},
         "floor/1: 0.9, pneumo/1: 1.04"),
        ("hl7", {"inbound": {"target_checks": {"quiet_machine": {"value": "yes", "met": True}}}}, None),
        ("fhir", {"targets": {"quiet_machine": {"value": ["read/16: 0.3"], "met": False}}}, "read/16: 0.3"),
        ("fhir", {"targets": {}}, None),
        ("ingest", {"results": []}, None),
        ("hl7", None, None),
    ],
)
def test_disturbed_runs_are_reported(name: str, doc: dict[str, Any] | None, why: str | None) -> None:
    assert run_all.disturbed(name, doc) == why


# -- figures from each benchmark's JSON document (the shapes the scripts write) --------------------------


def test_rows_ingest() -> None:
    doc = {"benchmark": "ingest", "results": [
        {"target": t, "associations": a, "per_second": v}
        for t, a, v in [("pneumo", 1, 30.0), ("storescp", 1, 60.0), ("orthanc", 1, 20.0), ("pneumo", 4, 40.0),
                        ("pneumo-2proc", 4, 50.0), ("storescp", 4, 100.0), ("orthanc", 4, 50.0)]]}
    rows = run_all.rows_ingest(doc)
    got = {(r.metric, r.peer): round(r.ratio or 0, 2) for r in rows}
    assert got == {
        ("C-STOREs/s, 1 assoc., Pneumo 1 acceptor process", "DCMTK storescp"): 0.5,
        ("C-STOREs/s, 1 assoc., Pneumo 1 acceptor process", "Orthanc"): 1.5,
        ("C-STOREs/s, 4 assoc., Pneumo 1 acceptor process", "DCMTK storescp"): 0.4,
        ("C-STOREs/s, 4 assoc., Pneumo 1 acceptor process", "Orthanc"): 0.8,
        ("C-STOREs/s, 4 assoc., Pneumo 2 acceptor processes", "DCMTK storescp"): 0.5,
        ("C-STOREs/s, 4 assoc., Pneumo 2 acceptor processes", "Orthanc"): 1.0,
    }
    assert all(r.higher_is_better for r in rows)


def test_rows_inference() -> None:
    stats = {"median": 20.0, "p95": 25.0}
    doc = {"options": {"max_batch": 8},
           "ort_floor": {"batch1_ms": {"median": 10.0, "p95": 11.0}, "batch8_ms": {"median": 60.0, "p95": 70.0},
                         "batch1_images_per_s": 100.0, "batch8_images_per_s": 133.3},
           "latency_ms": {"RG1_UNCR.dcm": {"decode+preprocess+infer": stats}},
           "throughput_RG1_UNCR": {"batch1_sequential": {"images_per_s": 40.0, "mean_batch": 1},
                                   "concurrent8_microbatched": {"images_per_s": 60.0, "mean_batch": 4.0}}}
    latency, one, many = run_all.rows_inference(doc)
    assert (latency.ratio, latency.higher_is_better) == (2.0, False)
    assert (one.ratio, one.higher_is_better) == (0.4, True)
    assert many.metric == "images/s, 8 callers (micro-batched)" and many.peer.endswith("batch 8")
    assert many.ratio == pytest.approx(60.0 / 133.3)


def test_rows_e2e() -> None:
    doc = {"latency_ms": {"n": 20, "median": 200.0, "p95": 370.0, "max": 400.0, "storescu_done_median": 100.0},
           "throughput": {"radiographs": 200, "associations": 4, "ingest_seconds": 8.0, "all_srs_seconds": 24.0,
                          "studies_per_minute": 500.0}}
    median, p95, rate = run_all.rows_e2e(doc)
    assert (median.ratio, median.higher_is_better) == (2.0, False)
    assert p95.peer == "" and p95.ratio is None
    assert rate.peer_value == 1500.0 and rate.ratio == pytest.approx(1 / 3)  # 200 images in 8 s = 1500/min
    assert run_all.rows_e2e({"latency_ms": None}) == []  # --latency 0 --count 0: nothing to report


def test_rows_fhir() -> None:
    doc = {"results": [{"scenario": s, "clients": c, "per_second": v, "p99_ms": p}
                       for s, c, v, p in [("floor", 1, 500.0, 5.0), ("read", 1, 200.0, 25.0), ("date", 1, 50.0, 150.0),
                                          ("read", 16, 210.0, 230.0)]]}
    rows = run_all.rows_fhir(doc)
    got = {(r.metric, r.higher_is_better): r.ratio for r in rows}
    assert got[("read by id, 1 client(s), requests/s", True)] == 0.4
    assert got[("read by id, 1 client(s), p99", False)] == 5.0
    assert got[("search by date + _include, 1 client(s), requests/s", True)] == 0.1
    assert got[("read by id, 16 client(s), requests/s", True)] is None  # no floor at 16 clients in this run
    assert "not run" in run_all.render_table([rows[-1]])


def test_rows_hl7() -> None:
    doc = {"inbound": {"results": [{"target": t, "connections": c, "per_second": v}
                                   for t, c, v in [("floor", 1, 10000.0), ("floor-db", 1, 2000.0), ("pneumo", 1, 400.0),
                                                   ("pneumo-pg", 1, 250.0), ("floor", 8, 20000.0), ("pneumo", 8, 600.0)]]},
           "result_to_oru": {"studies": 30, "cstore_to_oru": {"p50_ms": 550.0, "p99_ms": 700.0}}}
    rows = run_all.rows_hl7(doc)
    got = {(r.metric, r.peer.split(" ")[0]): r.ratio for r in rows}
    assert got[("ORM orders/s with ACK, 1 conn., Pneumo on SQLite", "bare")] == 0.04
    assert got[("ORM orders/s with ACK, 1 conn., Pneumo on SQLite", "MLLP")] == 0.2
    assert got[("ORM orders/s with ACK, 1 conn., Pneumo on PostgreSQL", "bare")] == 0.025
    assert got[("ORM orders/s with ACK, 8 conn., Pneumo on SQLite", "bare")] == 0.03
    assert got[("C-STORE start → ORU at the EHR, p50 (n = 30)", "")] is None
    assert run_all.rows_hl7({"inbound": {"results": []}}) == []


# -- plans: what cannot run is said, and the rest goes on ----------------------------------------------------


def test_plans_without_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_all, "ORTHANC_BINARY", "/nonexistent/Orthanc")
    plans = {p.name: p for p in run_all.make_plans(run_all.BENCHMARKS, False, "postgresql+psycopg://x@127.0.0.1:1/x",
                                                   lambda tool: False)}
    assert plans["ingest"].why_not == "storescu not found (apt-get install dcmtk)"
    assert plans["e2e"].why_not == "storescu, storescp not found (apt-get install dcmtk)"
    assert plans["fhir"].why_not == "wrk not found (apt-get install wrk)"
    assert plans["inference"].why_not is None
    hl7 = plans["hl7"]
    assert hl7.why_not is None and "pneumo-pg" not in hl7.args and "pneumo" in hl7.args
    assert hl7.skipped and hl7.skipped[0].note.startswith("not run: PostgreSQL not reachable")


def test_plan_ingest_drops_missing_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_all, "ORTHANC_BINARY", "/nonexistent/Orthanc")
    plan = run_all.plan_ingest(False, lambda tool: tool == "storescu")
    targets = plan.args[plan.args.index("--targets") + 1:]
    assert targets == ["pneumo", "pneumo-2proc", "pynetdicom"]
    assert {r.peer for r in plan.skipped} == {"DCMTK storescp", "Orthanc"}
    quick = run_all.plan_ingest(True, lambda tool: True)
    assert quick.args[:4] == ["--count", "20", "--associations", "1"]


def test_a_failing_benchmark_is_a_row(tmp_path: Path) -> None:
    """The real script, failing for a real reason (no model package): a "not run" row with its message."""
    plan = Plan("inference", ["--model", str(tmp_path / "no-model")], skipped=[run_all.not_run("inference", "x", "y", "z")])
    outcome = run_all.run_benchmark(plan, tmp_path, timeout=120, echo=False)
    assert outcome.document is None
    assert outcome.rows[0].note.startswith("not run: exit 2: ERROR: no model package at")
    assert outcome.rows[1:] == plan.skipped


# -- one real run, end to end --------------------------------------------------------------------------------


def test_quick_run_of_the_cheapest_benchmark(tmp_path: Path) -> None:
    """`bench/run_all.py --quick --only inference` as a subprocess: a table with Pneumo against the ONNX Runtime floor."""
    report, document = tmp_path / "report.md", tmp_path / "run.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--only", "inference", "--quiet",
         "--output", str(report), "--json", str(document)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = report.read_text()
    assert re.match(r"Run of \d{4}-\d\d-\d\d \d\d:\d\d UTC, commit \S+.*\*\*quick\*\*", text)
    assert "Machine: " in text and " cores, " in text and "Python 3." in text
    rows = [line for line in text.splitlines() if line.startswith("| inference |")]
    assert len(rows) == 3
    for line in rows:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 7
        assert re.fullmatch(r"[\d,.]+ (ms|img/s)", cells[2]), cells
        assert cells[3].startswith("ONNX Runtime session.run")
        pneumo, peer = (float(cells[i].split()[0].replace(",", "")) for i in (2, 4))
        assert float(cells[5].rstrip("×")) == pytest.approx(pneumo / peer, rel=0.02)  # figures shown rounded
        assert cells[6] == ("lower" if cells[2].endswith("ms") else "higher")
    saved = json.loads(document.read_text())
    assert saved["quick"] is True and saved["benchmarks"][0]["document"]["ort_floor"]["batch1_ms"]["median"] > 0
