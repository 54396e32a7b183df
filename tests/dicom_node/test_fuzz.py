"""Fuzz the real ``pneumo serve`` with malformed PDUs and datasets (mutations of real ones).

The promise (issue "Keep every promise under attack and faults"): whatever arrives, the server
answers or closes cleanly every time — never hangs, never says Success for a dataset that cannot
be parsed — keeps serving a configured peer, and leaves no temp files behind.

Deterministic: every case is generated from ``PNEUMO_FUZZ_SEED`` and its index, so a failing
case can be replayed by its number. Bounded: every read has a deadline (``CASE_LIMIT``); a case
that gets neither an answer nor a close within it is a failure. Only 127.0.0.1 is contacted.

Categories:

* ``associate`` — a valid A-ASSOCIATE-RQ from the configured peer STORESCU, mutated (bit flips,
  truncation, wrong/huge lengths, wrong PDU types, garbage/duplicated items, broken fields);
* ``dataset`` — a valid association, a well-formed C-STORE-RQ, and a real dataset (CT_small /
  RG1_UNCR, re-UIDed) mutated (truncation, element length corruption, never-closed
  undefined-length sequences, Pixel Data length 0xFFFFFFF0, header bit flips, ...);
* ``pdata`` — a valid association and a malformed P-DATA-TF stream (bad PDVs, commands);
* ``stall`` — half-open connections (silent, partial PDU, idle association, dataset announced
  but never sent): the server's own timers must close them.

Every ``CHECK_EVERY`` cases the configured peer ECHOSCU must C-ECHO. At the end: a burst of
``BURST`` well-framed but malformed A-ASSOCIATE-RQs (replayed from the run) must not lock a
configured peer out; then pynetdicom C-ECHO + C-STORE and DCMTK ``echoscu`` must work, the
server must still run, ``tmp/`` must be empty within ``TMP_DEADLINE`` and every indexed file must
match its sha256 and size (``pneumo instances --json``), and every Success must be indexed.

Truncated PDUs (declared length > bytes sent) are followed by a half-close (SHUT_WR), so the
server could see EOF at once; only the ``stall`` cases are meant to rely on the server's timers.

A Success is judged by a strict structural oracle (``pdu_fuzz.defect``): every length fits,
every sequence and item is closed, VRs are known, the identifiers match the request. Pixel
values that do not fit Rows/Columns are not "unparseable" (architecture §3 step 3: a decode
failure is a stored ``failed`` verdict); tags out of order or repeated are counted, not asserted.

Run: ``pytest -m slow tests/dicom_node/test_fuzz.py -s`` (``-s`` prints the summary and the path
of ``fuzz_outcomes.jsonl``, one line per case). ``PNEUMO_FUZZ_SEED`` / ``PNEUMO_FUZZ_CASES``
change the seed and the number of cases.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import copy_with_new_uids, sample
from tests.dicom_node import pdu_fuzz as fz
from tests.gateway.serve_process import ServeProcess, pneumo, write_config

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("PNEUMO_FUZZ_SEED", "20261130"))
TOTAL_CASES = int(os.environ.get("PNEUMO_FUZZ_CASES", "1100"))
CASE_LIMIT = 15.0  # seconds without an answer or a close = a hang
SENDERS = 6  # most waiting is on server timers, not CPU
CHECK_EVERY = 200  # cases between two "a configured peer can still C-ECHO" checks
BURST = 64  # malformed A-ASSOCIATE-RQs replayed back to back before the final peer checks
#: Mutations that keep a complete, correctly framed A-ASSOCIATE-RQ PDU (type 1, right length): the
#: listener hands them to pynetdicom, which starts an association and then aborts it.
WELL_FRAMED_ASSOCIATE_RQ = tuple(
    f"associate/{kind}" for kind in ("garbage-item", "item-length", "splice", "contexts", "sub-item", "truncate-fixed", "field")
)
STALL_EVERY = 90  # one half-open-connection case per this many
TMP_DEADLINE = 30.0
SLOW = 3.0  # seconds: an answer this late is reported in the summary (a timer, not the parser, ended the case)
PEERS = {"STORESCU", "ECHOSCU", "TESTSCU"}
CALLED = "PNEUMO"

# Server timers short enough that half-open connections are reaped well inside CASE_LIMIT.
DICOM_EXTRA = "acse_timeout = 5.0\ndimse_timeout = 10.0\nnetwork_timeout = 5.0"


@dataclass
class Outcome:
    kind: str
    problem: str | None = None
    seconds: float = 0.0
    stored_uid: str | None = None
    started: float = 0.0  # wall clock, to match a leftover file's mtime to the cases then in flight


@dataclass
class Case:
    index: int
    category: str
    description: str
    run: Callable[[int], Outcome]


# ------------------------------------------------------------------------------- templates


def _uid(rng: random.Random, length: int) -> str:
    digits = str(rng.randrange(1, 10)) + "".join(str(rng.randrange(10)) for _ in range(length - 6))
    return "2.25." + digits


def _template(name: str, directory: Path) -> fz.DatasetTemplate:
    rng = random.Random(f"{SEED}:template:{name}")
    uids = (_uid(rng, 48), _uid(rng, 50), _uid(rng, 52))
    path = copy_with_new_uids(sample(name), directory, study_uid=uids[0], series_uid=uids[1], sop_uid=uids[2])
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:138] == b"\x02\x00\x00\x00UL"
    start = 132 + 12 + int.from_bytes(raw[140:144], "little")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == fz.EXPLICIT_VR_LE
    template = fz.DatasetTemplate(name, raw[start:], str(ds.SOPClassUID), uids)
    template.table = fz.elements(template.data)  # the original must pass the oracle's walker
    assert fz.defect(template.data, template.sop_class, uids[2]) is None, fz.defect(template.data, template.sop_class, uids[2])
    return template


def _fresh_uids(rng: random.Random, template: fz.DatasetTemplate) -> tuple[str, str, str]:
    study, series, sop = (_uid(rng, len(u)) for u in template.uids)
    return study, series, sop


def _store_context(template: fz.DatasetTemplate) -> list[fz.Context]:
    return [fz.Context(1, template.sop_class, (fz.EXPLICIT_VR_LE,)), fz.Context(3, fz.VERIFICATION, (fz.IMPLICIT_VR_LE,))]


# ------------------------------------------------------------------------------- case runners


def _timed(run: Callable[[int], Outcome]) -> Callable[[int], Outcome]:
    def wrapper(port: int) -> Outcome:
        started, wall = time.monotonic(), time.time()
        try:
            outcome = run(port)
        except fz.Hang as exc:
            outcome = Outcome("hang", f"hang: {exc}")
        except ConnectionRefusedError:
            outcome = Outcome("connect-refused", "connect-refused: server refused the TCP connection")
        except OSError as exc:
            outcome = Outcome("client-error", f"client-error: client socket error {exc.__class__.__name__}: {exc}")
        outcome.seconds = time.monotonic() - started
        outcome.started = wall
        return outcome

    return wrapper


def _associate(peer: fz.Peer, template: fz.DatasetTemplate) -> tuple[fz.Accepted | None, str]:
    peer.send(fz.associate_rq("STORESCU", CALLED, _store_context(template), max_pdu=65536))
    answer = peer.read()
    if answer.kind == "associate-rj" and len(answer.body) >= 4:
        result, source, reason = answer.body[1:4]  # PS3.8 9.3.4
        return None, f"associate-rj (result {result}, source {source}, reason {reason})"
    if answer.kind != "associate-ac":
        return None, answer.kind
    accepted = fz.parse_ac(answer.body)
    result = accepted.contexts.get(1)
    if result is None or result[0] != 0:
        return None, f"context rejected {result}"
    return accepted, "associate-ac"


def _release(peer: fz.Peer, kind: str) -> Outcome:
    """Close a case politely after a DIMSE answer; the release itself must be answered too."""
    if not peer.send(fz.release_rq()):
        return Outcome(f"{kind}; then closed")
    answer = peer.read()
    if answer.kind in ("release-rp", "abort", "closed"):
        return Outcome(kind)
    return Outcome(f"{kind}; release answered {answer.kind}", f"release-misanswered: A-RELEASE-RQ answered by {answer.kind}")


def run_associate(mutation: fz.Mutation) -> Callable[[int], Outcome]:
    def run(port: int) -> Outcome:
        peer = fz.Peer(port, CASE_LIMIT)
        try:
            peer.send(mutation.data)
            if not mutation.complete:
                peer.half_close()
            answer = peer.read()
            if answer.kind == "associate-ac":
                calling = mutation.data[26:42].decode("ascii", "replace").strip(" \0")
                called = mutation.data[10:26].decode("ascii", "replace").strip(" \0")
                problem = None
                if calling not in PEERS:
                    problem = f"accepted-unconfigured-ae: association accepted for calling AE {calling!r}, not a configured peer"
                elif called != CALLED:
                    problem = f"accepted-wrong-called-ae: association accepted for called AE {called!r}"
                outcome = _release(peer, "associate-ac")
                outcome.problem = outcome.problem or problem
                return outcome
            if answer.kind in ("associate-rj", "abort", "closed"):
                return Outcome(answer.kind)
            return Outcome(answer.kind, f"unexpected-answer: unexpected answer to an A-ASSOCIATE-RQ: {answer.kind}")
        finally:
            peer.close()

    return run


def run_dataset(template: fz.DatasetTemplate, mutation: fz.Mutation, request_uid: str) -> Callable[[int], Outcome]:
    why = fz.defect(mutation.data, template.sop_class, request_uid)

    def run(port: int) -> Outcome:
        peer = fz.Peer(port, CASE_LIMIT)
        try:
            accepted, kind = _associate(peer, template)
            if accepted is None:
                return Outcome(
                    f"setup {kind}", f"valid-association-refused: a valid association from STORESCU was answered {kind}"
                )
            stream = fz.p_data(fz.pdv(1, 0x03, fz.c_store_rq(1, template.sop_class, request_uid)))
            stream += b"".join(fz.fragments(mutation.data, 1, accepted.max_pdu))
            peer.send(stream)
            response = fz.read_dimse_response(peer)
            if isinstance(response, fz.Answer):
                if response.kind in ("abort", "closed"):
                    return Outcome(response.kind)
                return Outcome(response.kind, f"unexpected-answer: unexpected answer to a C-STORE: {response.kind}")
            _, command = response
            status = int.from_bytes(command.get(0x0900, b"\xff\xff"), "little")
            outcome = _release(peer, f"status 0x{status:04X}")
            if status == 0x0000:
                if why is not None and why[0] == fz.UNPARSEABLE:
                    outcome.problem = f"success-for-unparseable: Success (0x0000) for a dataset that cannot be parsed ({why[1]})"
                elif why is not None:
                    outcome.kind = f"status 0x0000 for {why[0]}"
                outcome.stored_uid = request_uid
            return outcome
        finally:
            peer.close()

    return run


#: P-DATA mutations after which a Success would be a lie: no (valid) dataset was ever delivered.
_NO_VALID_STORE = {
    "unknown-context",
    "command-truncated",
    "pdv-overrun",
    "pdv-zero",
    "no-dataset-flag",
    "unknown-command",
    "pdata-garbage",
    "command-only",
    "data-first",
    "second-associate",
}


def run_pdata(template: fz.DatasetTemplate, rng: random.Random) -> tuple[Callable[[int], Outcome], str]:
    uids = _fresh_uids(rng, template)
    dataset = template.with_uids(uids)
    accepted_pdu = 262144  # replaced by the real value at run time; only used for fragmenting
    mutation = fz.mutate_pdata(rng, 1, template.sop_class, uids[2], dataset, accepted_pdu)
    kind = mutation.name.split("/", 1)[1]

    def run(port: int) -> Outcome:
        peer = fz.Peer(port, CASE_LIMIT)
        try:
            accepted, answered = _associate(peer, template)
            if accepted is None:
                return Outcome(
                    f"setup {answered}", f"valid-association-refused: a valid association from STORESCU was answered {answered}"
                )
            peer.send(mutation.data)
            if not mutation.complete:
                peer.half_close()
            response = fz.read_dimse_response(peer)
            if isinstance(response, fz.Answer):
                if response.kind in ("abort", "closed", "release-rp"):
                    return Outcome(response.kind)
                return Outcome(response.kind, f"unexpected-answer: unexpected answer to a malformed P-DATA-TF: {response.kind}")
            _, command = response
            status = int.from_bytes(command.get(0x0900, b"\xff\xff"), "little")
            outcome = _release(peer, f"status 0x{status:04X}")
            if status == 0x0000 and kind in _NO_VALID_STORE:
                outcome.problem = f"success-for-malformed-pdata: Success (0x0000) after {mutation.describe()}"
            if status == 0x0000 and kind not in _NO_VALID_STORE:
                outcome.stored_uid = uids[2]
            return outcome
        finally:
            peer.close()

    return run, mutation.describe()


def run_stall(variant: str, template: fz.DatasetTemplate, rng: random.Random) -> Callable[[int], Outcome]:
    uids = _fresh_uids(rng, template)
    valid_rq = fz.associate_rq("STORESCU", CALLED, _store_context(template))

    def run(port: int) -> Outcome:
        peer = fz.Peer(port, CASE_LIMIT)
        try:
            if variant == "partial-header":
                peer.send(valid_rq[:3])
            elif variant == "partial-rq":
                peer.send(valid_rq[:-10])
            elif variant == "huge-rq":
                peer.send(valid_rq[:2] + (0xFFFFFFF0).to_bytes(4, "big") + valid_rq[6:])
            elif variant != "silent":
                accepted, answered = _associate(peer, template)
                if accepted is None:
                    return Outcome(
                        f"setup {answered}",
                        f"valid-association-refused: a valid association from STORESCU was answered {answered}",
                    )
                command = fz.p_data(fz.pdv(1, 0x03, fz.c_store_rq(1, template.sop_class, uids[2])))
                if variant == "partial-pdata":
                    peer.send(command + fz.p_data(fz.pdv(1, 0x02, template.with_uids(uids)))[:1000])
                elif variant == "command-only":
                    peer.send(command)
            answer = peer.read()  # nothing more is coming from us: the server must give up
            if answer.kind in ("abort", "closed", "associate-rj"):
                return Outcome(answer.kind)
            return Outcome(answer.kind, f"unexpected-answer: unexpected answer on a stalled connection: {answer.kind}")
        finally:
            peer.close()

    return run


STALL_VARIANTS = ("silent", "partial-header", "partial-rq", "huge-rq", "idle-association", "partial-pdata", "command-only")


def build_cases(ct: fz.DatasetTemplate, radiograph: fz.DatasetTemplate) -> list[Case]:
    valid_rq = fz.associate_rq("STORESCU", CALLED, _store_context(ct))
    cases: list[Case] = []
    stalls = 0
    for index in range(TOTAL_CASES):
        rng = random.Random(f"{SEED}:{index}")
        if index % STALL_EVERY == STALL_EVERY // 2:
            variant = STALL_VARIANTS[stalls % len(STALL_VARIANTS)]
            stalls += 1
            cases.append(Case(index, "stall", f"stall/{variant}", _timed(run_stall(variant, ct, rng))))
            continue
        roll = rng.random()
        if roll < 0.45:
            mutation = fz.mutate_associate(rng, valid_rq)
            cases.append(Case(index, "associate", mutation.describe(), _timed(run_associate(mutation))))
        elif roll < 0.90:
            template = radiograph if rng.random() < 0.02 else ct
            uids = _fresh_uids(rng, template)
            mutation = fz.mutate_dataset(rng, template, template.with_uids(uids))
            request_uid = uids[2]
            if mutation.name == "dataset/uid-mismatch":
                request_uid = _uid(rng, len(uids[2]))
            description = f"{template.name} {mutation.describe()}"
            cases.append(Case(index, "dataset", description, _timed(run_dataset(template, mutation, request_uid))))
        else:
            run, description = run_pdata(ct, rng)
            cases.append(Case(index, "pdata", description, _timed(run)))
    return cases


# ------------------------------------------------------------------------------- peer checks


def echo_problem(port: int) -> str | None:
    """A configured peer (ECHOSCU, pynetdicom) can still associate and C-ECHO."""
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CASE_LIMIT
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
    if not assoc.is_established:
        rejected = assoc.acceptor.primitive if assoc.is_rejected else None
        how = (
            f"A-ASSOCIATE-RJ result {rejected.result}, source {rejected.result_source}, reason {rejected.diagnostic}"
            if rejected is not None
            else ("aborted" if assoc.is_aborted else "no association")
        )
        return f"configured peer ECHOSCU could not associate ({how})"
    try:
        status = assoc.send_c_echo()
        if not status or status.Status != 0x0000:
            return f"C-ECHO answered {status.Status if status else 'nothing'}"
    finally:
        assoc.release()
    return None


def store_problem(port: int, path: Path) -> str | None:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CASE_LIMIT
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
    if not assoc.is_established:
        return "configured peer STORESCU could not associate"
    try:
        status = assoc.send_c_store(ds)
        if not status or status.Status != 0x0000:
            return f"valid C-STORE answered {hex(status.Status) if status else 'nothing'}"
    finally:
        assoc.release()
    return None


def dcmtk_echo_problem(port: int) -> str | None:
    echoscu = shutil.which("echoscu")
    if echoscu is None:
        return None
    done = subprocess.run(
        [echoscu, "-to", "15", "-aet", "ECHOSCU", "-aec", CALLED, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return None if done.returncode == 0 else f"DCMTK echoscu failed: {done.stderr.strip()[:300]}"


# ------------------------------------------------------------------------------- the test


def test_fuzzed_pdus_and_datasets_are_answered_or_closed_cleanly(tmp_path: Path) -> None:
    ct = _template("CT_small.dcm", tmp_path / "templates")
    radiograph = _template("RG1_UNCR.dcm", tmp_path / "templates")
    cases = build_cases(ct, radiograph)
    assert len(cases) == TOTAL_CASES
    assert TOTAL_CASES >= 1000 or "PNEUMO_FUZZ_CASES" in os.environ  # the promise is about >= 1,000 cases

    data_dir = tmp_path / "var"
    config = write_config(tmp_path / "pneumo.toml", data_dir, dicom_extra=DICOM_EXTRA)
    server = ServeProcess(config, tmp_path / "serve.log").start()
    problems: list[str] = []
    results: list[tuple[Case, Outcome]] = []
    rows: list[dict[str, object]] = []
    fuzz_seconds = 0.0
    log_text = ""
    started = time.monotonic()
    try:
        port = server.dicom_port
        with ThreadPoolExecutor(SENDERS, thread_name_prefix="fuzz") as pool:
            for chunk_start in range(0, len(cases), CHECK_EVERY):
                chunk = cases[chunk_start : chunk_start + CHECK_EVERY]
                for case, outcome in zip(chunk, pool.map(lambda c: c.run(port), chunk), strict=True):
                    results.append((case, outcome))
                assert server.proc is not None
                if server.proc.poll() is not None:
                    problems.append(f"server-exited: server exited (rc {server.proc.returncode}) by case {chunk[-1].index}")
                    break
                if (problem := echo_problem(port)) is not None:
                    problems.append(f"peer-check-failed: after case {chunk[-1].index}: {problem}")
        fuzz_seconds = time.monotonic() - started

        for case, outcome in results:
            if outcome.problem:
                label, _, text = outcome.problem.partition(": ")
                problems.append(f"{label}: case {case.index} [{case.description}] -> {outcome.kind}: {text}")

        # Under a burst: replay malformed A-ASSOCIATE-RQs that were answered with A-ABORT, back to
        # back (never more than SENDERS connections at once), then a configured peer must still
        # get in at once; every slot an aborted association keeps would count against it.
        aborted = [
            case for case, outcome in results if outcome.kind == "abort" and case.description.startswith(WELL_FRAMED_ASSOCIATE_RQ)
        ][:BURST]
        with ThreadPoolExecutor(SENDERS, thread_name_prefix="burst") as pool:
            list(pool.map(lambda c: c.run(port), aborted))
        if (problem := echo_problem(port)) is not None:
            locked = time.monotonic()
            while echo_problem(port) is not None and time.monotonic() - locked < 60:
                time.sleep(0.5)  # how long the lock-out lasts, so the checks below test recovery
            problems.append(
                f"peer-locked-out-after-burst: right after {len(aborted)} malformed A-ASSOCIATE-RQs answered with "
                f"A-ABORT (at most {SENDERS} connections at a time): {problem}; "
                f"it got in again after {time.monotonic() - locked:.1f} s"
            )

        # A configured peer is still served: pynetdicom C-ECHO and C-STORE, DCMTK echoscu.
        alive = server.proc is not None and server.proc.poll() is None
        if not alive:
            problems.append("server-not-running: server is not running after the fuzz run")
        else:
            final = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "final")
            for check in (echo_problem(port), store_problem(port, final), dcmtk_echo_problem(port)):
                if check is not None:
                    problems.append(f"peer-check-failed: at the end: {check}")

        # No temp files once every association is gone (half-open ones are reaped by timers).
        tmp_dir = data_dir / "tmp"
        deadline = time.monotonic() + TMP_DEADLINE
        leftovers = sorted(p for p in tmp_dir.iterdir() if p.is_file())
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.5)
            leftovers = sorted(p for p in tmp_dir.iterdir() if p.is_file())
        if leftovers:
            sizes = ", ".join(f"{p.name} ({p.stat().st_size} B; {_in_flight(results, p.stat().st_mtime)})" for p in leftovers[:8])
            problems.append(
                f"tmp-leftovers: {len(leftovers)} file(s) left in {tmp_dir} {TMP_DEADLINE:.0f} s after the fuzzing: {sizes}"
            )

        # Every stored instance is intact and every Success is in the index.
        listed = pneumo(config, "instances", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        for row in rows:
            path = Path(row["path"])
            if not path.is_file():
                problems.append(f"instance-file-missing: indexed instance {row['sop_instance_uid']} has no file")
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != row["sha256"] or path.stat().st_size != row["size"]:
                problems.append(
                    f"instance-sha-mismatch: stored file of {row['sop_instance_uid']} differs from the index (sha256/size)"
                )
        indexed = {row["sop_instance_uid"] for row in rows}
        for case, outcome in results:
            if outcome.stored_uid and outcome.stored_uid not in indexed:
                problems.append(f"success-not-indexed: case {case.index} [{case.description}] got Success but is not indexed")
    finally:
        log_text = (tmp_path / "serve.log").read_text(errors="replace") if (tmp_path / "serve.log").exists() else ""
        server.kill()

    summary = _summary(results, fuzz_seconds, len(rows), log_text)
    print(summary)
    outcomes_file = tmp_path / "fuzz_outcomes.jsonl"  # every case, for replaying one by its index
    outcomes_file.write_text(
        "".join(
            json.dumps(
                {
                    "case": c.index,
                    "category": c.category,
                    "mutation": c.description,
                    "answer": o.kind,
                    "seconds": round(o.seconds, 3),
                    "started": round(o.started, 3),
                    "problem": o.problem,
                }
            )
            + "\n"
            for c, o in results
        )
    )
    print(f"per-case outcomes: {outcomes_file}")
    report = _problem_report(problems)
    print(report)
    assert not problems, (
        f"{len(problems)} problem(s) of {len(set(p.split(':')[0] for p in problems))} kind(s):\n{report}\n{summary}"
    )


def _in_flight(results: list[tuple[Case, Outcome]], when: float) -> str:
    """The cases that were running when a leftover file was last written (its likely creators)."""
    running = [c for c, o in results if o.started - 0.05 <= when <= o.started + o.seconds + 0.05]
    return "written during case(s) " + ", ".join(f"{c.index} [{c.description}]" for c in running[:4]) if running else "no case"


def _problem_report(problems: list[str]) -> str:
    """Problems grouped by kind (the text before the first colon): count and the first few."""
    grouped: dict[str, list[str]] = collections.defaultdict(list)
    for problem in problems:
        label, _, text = problem.partition(": ")
        grouped[label].append(text)
    lines = []
    for label, texts in sorted(grouped.items(), key=lambda item: -len(item[1])):
        lines.append(f"  {label}: {len(texts)}")
        lines.extend(f"      {text}" for text in texts[:4])
    return "\n".join(lines)


def _summary(results: list[tuple[Case, Outcome]], seconds: float, stored: int, log_text: str) -> str:
    by_category: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    slowest: dict[str, float] = collections.defaultdict(float)
    busy: dict[str, float] = collections.defaultdict(float)
    for case, outcome in results:
        kind = outcome.kind.split(";")[0]
        by_category[case.category][kind] += 1
        slowest[case.category] = max(slowest[case.category], outcome.seconds)
        busy[case.category] += outcome.seconds
    crashed = log_text.count("thread_crashed") + log_text.count("uncaught_exception")
    lines = [
        f"fuzz seed {SEED}: {len(results)} cases in {seconds:.1f} s, {stored} instance(s) indexed, "
        f"{log_text.count('Traceback')} traceback(s) and {crashed} crashed thread(s) in the server log"
    ]
    for category, counter in sorted(by_category.items()):
        total = sum(counter.values())
        kinds = ", ".join(f"{kind} {n}" for kind, n in counter.most_common())
        lines.append(f"  {category:<9} {total:>4} (slowest {slowest[category]:.1f} s, {busy[category]:.0f} sender-s): {kinds}")
    failed = collections.Counter(
        f"{outcome.problem.partition(':')[0]} <- {case.description.split(':')[0]}" for case, outcome in results if outcome.problem
    )
    slow = collections.Counter(
        f"{case.description.split(':')[0]} -> {outcome.kind}"
        for case, outcome in results
        if outcome.seconds > SLOW and not outcome.problem
    )
    lines.append(f"  answered/closed only after > {SLOW:.0f} s (server timers, not failures): {sum(slow.values())}")
    lines.extend(f"    {n:>4}  {what}" for what, n in slow.most_common(8))
    lines.append(f"  cases with a problem: {sum(failed.values())}")
    lines.extend(f"    {n:>4}  {what}" for what, n in failed.most_common())
    return "\n".join(lines)
