"""The delivery outbox end to end: real reports, real job worker, real PACS (storescp, Orthanc).

Reports are SRs built by ``dicom_node.sr.build_ai_sr`` from a real radiograph header, stored and
queued in one transaction exactly as the inference workflow does it.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from audit.models import AuditRecord
from audit.store import verify_chain
from conf.settings import DicomDestination, Settings
from dicom_node.sr import build_ai_sr
from dicom_node.storage_scu import send_instance
from gateway.app import Runtime, dicom_channel, open_runtime, outbox_kind, result_fanout
from gateway.cli import build_parser
from storage import jobs
from storage.index import add_instance
from storage.job_kinds import DELIVER_JOB, delivery_key
from storage.metadata import extract_metadata
from storage.models import DeliveryAttempt, Instance, InstanceOrigin, Job, JobState
from storage.runtime import JobRegistry, JobWorker, WorkerOptions
from tests.conftest import make_settings, sample, sample_ai_result
from tests.dicom_peers import Orthanc, StatusScp, StoreScp, free_port

RESULT = sample_ai_result()


@pytest.fixture(scope="module")
def radiograph_header() -> Dataset:
    return pydicom.dcmread(sample("RG1_UNCR.dcm"), stop_before_pixels=True)


RuntimeFactory = Callable[..., Runtime]


@pytest.fixture
def runtime_factory(tmp_path: Path) -> Iterator[RuntimeFactory]:
    """Open runtimes on *tmp_path*/var with the given destinations and delivery settings."""
    opened: list[Runtime] = []

    def _open(destinations: list[DicomDestination], database_url: str | None = None, **delivery: Any) -> Runtime:
        settings = make_settings(
            tmp_path, database_url, {"delivery": {"timeout_seconds": 5, **delivery}},
            destinations=[d.model_dump() for d in destinations],
        )
        runtime = open_runtime(settings)
        opened.append(runtime)
        return runtime

    yield _open
    for runtime in opened:
        runtime.close()


def store_report(runtime: Runtime, header: Dataset) -> str:
    """Build an SR for a fresh copy of *header*, store it and queue its deliveries, in one
    transaction (as the inference workflow does). Returns the SR's SOP Instance UID."""
    source = copy.deepcopy(header)
    source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    report = build_ai_sr(source, RESULT)
    relative = runtime.store.relative_path(report.StudyInstanceUID, report.SeriesInstanceUID, report.SOPInstanceUID)
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    stored = runtime.store.commit(runtime.store.stage_bytes(buffer.getvalue()), relative)
    with runtime.database.session() as session:
        instance = add_instance(
            session, extract_metadata(report), transfer_syntax_uid=str(report.file_meta.TransferSyntaxUID),
            relative_path=stored.relative_path, size=stored.size, sha256=stored.sha256,
            origin=InstanceOrigin.GENERATED, calling_ae=None,
        )
        result_fanout(runtime.settings).generated_instance(session, instance)
    return str(report.SOPInstanceUID)


def worker(runtime: Runtime, **options: Any) -> JobWorker:
    opts = WorkerOptions(poll_interval=options.get("poll_interval", 0.05), lease_seconds=60)
    registry = JobRegistry([outbox_kind(runtime, dicom_channel(runtime))])
    return JobWorker(runtime.database, registry, [DELIVER_JOB], opts, "deliver-test")


def delivery_jobs(runtime: Runtime) -> list[Job]:
    with runtime.database.read_session() as session:
        return list(session.execute(select(Job).where(Job.kind == DELIVER_JOB).order_by(Job.id)).scalars())


def attempts(runtime: Runtime) -> list[DeliveryAttempt]:
    with runtime.database.read_session() as session:
        return list(session.execute(select(DeliveryAttempt).order_by(DeliveryAttempt.id)).scalars())


def transfer_audits(runtime: Runtime) -> list[AuditRecord]:
    with runtime.database.read_session() as session:
        query = select(AuditRecord).where(AuditRecord.event_id == "110104").order_by(AuditRecord.seq)
        return list(session.execute(query).scalars())


def run_until(predicate: Callable[[], bool], step: Callable[[], object], deadline_s: float = 60.0) -> None:
    """Drive *step* until *predicate* holds; the short wait only paces polling of backoff timers."""
    deadline = time.monotonic() + deadline_s
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached before the deadline")
        if not step():
            pause.wait(0.02)


def cli(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    args = build_parser().parse_args(list(argv))
    capsys.readouterr()
    with structlog.testing.capture_logs():  # the command's log lines go to stderr in `pneumo`, not into its output
        code = int(args.handler(args, settings))
    return code, capsys.readouterr().out


# ----------------------------------------------------------------------------------- tests


def test_delivers_report_to_storescp(
    database_url: str, runtime_factory: RuntimeFactory, radiograph_header: Dataset, tmp_path: Path
) -> None:
    """SQLite and PostgreSQL: the report arrives; attempt, audit and job state commit together."""
    with StoreScp(tmp_path / "pacs", ae_title="PACS") as scp:
        dest = DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=scp.port)
        runtime = runtime_factory([dest], database_url)
        uid = store_report(runtime, radiograph_header)
        with runtime.database.session() as session:  # enqueueing again is a no-op
            instance = session.execute(select(Instance).where(Instance.sop_instance_uid == uid)).scalar_one()
            result_fanout(runtime.settings).generated_instance(session, instance)
        [job] = delivery_jobs(runtime)
        assert job.dedup_key == delivery_key("dicom", "pacs", uid)
        assert job.payload == {"channel": "dicom", "destination": "pacs", "subject": uid}

        assert worker(runtime).run_once("w1") is True
        received = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in scp.received()]

    assert received == [uid]
    [job] = delivery_jobs(runtime)
    assert job.state == JobState.DONE and job.attempts == 1
    [attempt] = attempts(runtime)
    assert (attempt.job_pk, attempt.outcome, attempt.peer_status, attempt.attempt) == (job.id, "delivered", "0x0000", 1)
    assert (attempt.channel, attempt.destination, attempt.subject, attempt.error) == ("dicom", "pacs", uid, None)
    [audit] = transfer_audits(runtime)
    event = audit.event
    assert (event["action"], event["outcome"]) == ("R", 0)
    source, destination = event["participants"]
    assert (source["user_id"], source["role_id"]["code"], source["user_is_requestor"]) == ("PNEUMO", "110153", True)
    assert (destination["user_id"], destination["role_id"]["code"]) == ("PACS", "110152")
    assert event["objects"][0]["instances"] == [uid]
    with runtime.database.read_session() as session:
        assert verify_chain(session).ok


def test_worker_dying_between_send_and_commit_leaves_one_copy_in_orthanc(
    runtime_factory: RuntimeFactory, radiograph_header: Dataset, tmp_path: Path
) -> None:
    """The one window where a report is sent twice: the C-STORE succeeded, the worker died before
    committing. The job's lease expires, another worker re-sends the same SOP Instance UID, and
    the PACS still holds exactly one report."""
    with Orthanc(tmp_path / "orthanc") as orthanc:
        dest = DicomDestination(name="orthanc", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
        runtime = runtime_factory([dest])
        uid = store_report(runtime, radiograph_header)

        # The worker that dies: claims the job (a lease that expires at once), sends, never commits.
        dead = jobs.claim(runtime.database, [DELIVER_JOB], "dead-worker", dt.timedelta(seconds=0))
        assert dead is not None
        with runtime.database.read_session() as session:
            stored_path = session.execute(select(Instance.path).where(Instance.sop_instance_uid == uid)).scalar_one()
        send_instance(runtime.store.absolute(stored_path), dest, "PNEUMO", 5)
        assert orthanc.sop_instance_uids() == [uid]

        assert worker(runtime).run_once("w2")  # takes over the expired lease and re-sends
        assert orthanc.sop_instance_uids() == [uid]
        assert len(orthanc.instances()) == 1

        # Later re-deliveries of the same object (an operator re-queue) are just as harmless.
        with runtime.database.session() as session:
            jobs.requeue(session, delivery_key("dicom", "orthanc", uid))
        assert worker(runtime).run_once("w3")
        assert len(orthanc.instances()) == 1

    with runtime.database.session() as session:  # the dead worker's late commit is refused
        assert jobs.complete(session, dead.id, "dead-worker") is False
    [job] = delivery_jobs(runtime)
    assert job.state == JobState.DONE
    assert [(a.attempt, a.outcome) for a in attempts(runtime)] == [(2, "delivered"), (1, "delivered")]


def test_destination_down_then_back_delivers_each_report_once(
    runtime_factory: RuntimeFactory, radiograph_header: Dataset, tmp_path: Path
) -> None:
    port = free_port()
    dest = DicomDestination(name="orthanc", ae_title="ORTHANC", host="127.0.0.1", port=port)
    runtime = runtime_factory([dest], max_attempts=50, backoff_base_seconds=0.05, backoff_cap_seconds=0.3)
    uids = sorted(store_report(runtime, radiograph_header) for _ in range(3))
    deliverer = worker(runtime)
    deliverer.start()
    try:
        def failed_twice_each() -> bool:
            rows = attempts(runtime)
            return all(sum(1 for a in rows if a.subject == uid and a.outcome == "failed") >= 2 for uid in uids)

        run_until(failed_twice_each, lambda: False)
        assert all(job.state in (JobState.PENDING, JobState.RUNNING) for job in delivery_jobs(runtime))

        with Orthanc(tmp_path / "orthanc", dicom_port=port) as orthanc:
            run_until(lambda: all(job.state == JobState.DONE for job in delivery_jobs(runtime)), lambda: False)
            deliverer.stop()
            assert orthanc.sop_instance_uids() == uids  # every report, exactly once
    finally:
        deliverer.stop()

    rows = attempts(runtime)
    for uid in uids:
        mine = [a for a in rows if a.subject == uid]
        assert [a.outcome for a in mine].count("delivered") == 1 and mine[-1].outcome == "delivered"
        assert all(a.peer_status is None and a.error for a in mine[:-1])
        assert [a.attempt for a in mine] == list(range(1, len(mine) + 1))
    outcomes = [record.outcome for record in transfer_audits(runtime)]
    assert outcomes.count(0) == 3 and set(outcomes) == {0, 4}  # successes and "restarted" failures


def test_dead_letter_then_operator_retry_via_cli(
    runtime_factory: RuntimeFactory, radiograph_header: Dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    dest = DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    runtime = runtime_factory([dest], max_attempts=2, backoff_base_seconds=0.05, backoff_cap_seconds=0.1)
    uid = store_report(runtime, radiograph_header)
    deliverer = worker(runtime)
    run_until(lambda: delivery_jobs(runtime)[0].state == JobState.FAILED, lambda: deliverer.run_once("w1"))

    [job] = delivery_jobs(runtime)
    assert job.attempts == 2 and job.last_error and "unreachable" in job.last_error
    assert [a.outcome for a in attempts(runtime)] == ["failed", "failed"]
    assert [r.outcome for r in transfer_audits(runtime)] == [4, 8]  # retried, then terminated

    settings = runtime.settings
    code, out = cli(settings, capsys, "deliveries", "list", "--state", "failed", "--json")
    [row] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and (row["id"], row["subject"], row["channel"], row["destination"]) == (job.id, uid, "dicom", "pacs")

    code, out = cli(settings, capsys, "deliveries", "show", str(job.id))
    detail = json.loads(out)
    assert code == 0 and [a["attempt"] for a in detail["attempt_history"]] == [1, 2]
    assert all(a["outcome"] == "failed" and a["peer_status"] is None for a in detail["attempt_history"])

    assert cli(settings, capsys, "deliveries", "show", "999999")[0] == 1
    assert cli(settings, capsys, "deliveries", "retry")[0] == 2  # neither ids nor --all-failed
    code, out = cli(settings, capsys, "deliveries", "retry", str(job.id), "999999")
    assert (code, json.loads(out)) == (1, {"retried": [job.id], "skipped": [999999]})
    [job] = delivery_jobs(runtime)
    assert (job.state, job.attempts) == (JobState.PENDING, 0)
    with runtime.database.read_session() as session:  # the operator's retry is audited
        [retry_audit] = session.execute(select(AuditRecord).where(AuditRecord.event_id == "110100")).scalars().all()
    assert str(job.id) in retry_audit.event["outcome_description"]
    assert retry_audit.event["event_types"][0]["code"] == "DELIVERY-RETRY"

    with StoreScp(tmp_path / "pacs", ae_title="PACS", port=port) as scp:
        assert deliverer.run_once("w2")
        assert len(scp.received()) == 1
    code, out = cli(settings, capsys, "deliveries", "list", "--state", "done", "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [job.id]
    code, out = cli(settings, capsys, "deliveries", "retry", "--all-failed")
    assert (code, json.loads(out)) == (0, {"retried": [], "skipped": []})
    code, out = cli(settings, capsys, "deliveries", "list")
    assert code == 0 and "done" in out and "1 delivery" in out


def test_permanent_rejection_dead_letters_at_once(
    runtime_factory: RuntimeFactory, radiograph_header: Dataset, tmp_path: Path
) -> None:
    comprehensive_3d_sr = "1.2.840.10008.5.1.4.1.1.88.34"
    with StatusScp([comprehensive_3d_sr], ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]) as scp:
        dest = DicomDestination(name="picky", ae_title=scp.ae_title, host="127.0.0.1", port=scp.port)
        runtime = runtime_factory([dest], max_attempts=5)
        uid = store_report(runtime, radiograph_header)
        scp.statuses[uid] = 0xC000  # Error: Cannot understand (PS3.4 B.2.3)
        assert worker(runtime).run_once("w1")
    [job] = delivery_jobs(runtime)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    [attempt] = attempts(runtime)
    assert (attempt.outcome, attempt.peer_status) == ("failed", "0xC000")
    assert [r.outcome for r in transfer_audits(runtime)] == [8]


def test_unknown_destination_dead_letters_at_once(
    runtime_factory: RuntimeFactory, radiograph_header: Dataset
) -> None:
    gone = DicomDestination(name="old-pacs", ae_title="OLD", host="127.0.0.1", port=free_port())
    runtime = runtime_factory([gone])
    store_report(runtime, radiograph_header)
    reconfigured = runtime_factory([])  # the destination was removed from the configuration
    assert worker(reconfigured).run_once("w1")
    [job] = delivery_jobs(reconfigured)
    assert job.state == JobState.FAILED and job.last_error and "not configured" in job.last_error
    [attempt] = attempts(reconfigured)
    assert attempt.destination == "old-pacs" and attempt.outcome == "failed"
