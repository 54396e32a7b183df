"""Scale-out: several ``pneumo worker`` processes share one PostgreSQL queue.

Real everything: PostgreSQL, a ``pneumo serve`` that receives the radiographs over DICOM (its own
workers off), three ``pneumo worker`` processes started by hand as an operator would on extra
hosts, the small contract-test model, and DCMTK ``storescp`` as the PACS that receives the SRs.

One worker is SIGKILLed while it holds a job. The survivors never release another process's jobs
(``storage.jobs.release_orphans`` runs only when a worker starts), so the held job can come back
only by its lease expiring — exactly what happens when a worker on another host dies. Then every
effect is counted: one result per image, one SR per image at the PACS, one successful delivery
attempt per delivery, and nothing left pending, running or dead-lettered.

A second test covers the same-host shortcut: a worker that starts on the host of a dead one takes
its jobs back at once, long before their lease would expire.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from conf.settings import load_settings
from inference.example_dicom import wrap_radiograph
from storage.db import Database
from storage.job_kinds import DELIVER_JOB, INFER_JOB
from storage.models import DeliveryAttempt, DeliveryOutcome, InferenceResult, Instance, InstanceOrigin, Job, JobState
from tests.conftest import dcmtk
from tests.dicom_peers import StoreScp
from tests.gateway.processes import alive, wait_for
from tests.gateway.serve_process import ServeProcess, pneumo, write_config
from tests.inference.tiny_model import write_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

IMAGES = 500
IMAGES_PER_STUDY = 10
#: Short, so that a dead worker's job comes back within the test; every job here takes far less.
LEASE_SECONDS = 4.0
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _config(tmp_path: Path, database_url: str, *, lease_seconds: float, pacs_port: int | None) -> Path:
    extra = [
        # [worker] (write_config opened it): what each `pneumo worker` process runs.
        "threads = 1",
        "poll_interval = 0.2",
        f"lease_seconds = {lease_seconds}",
        "[delivery]",
        "threads = 1",
        "backoff_base_seconds = 0.2",
        "backoff_cap_seconds = 1.0",
        "max_attempts = 100",
        "[inference]",
        f'model_dir = "{write_model_dir(tmp_path / "model")}"',
        "summary_image = false",  # one report per image keeps 500 images within the test's time
        "[results]",
        "study_stable_seconds = 0.5",
    ]
    if pacs_port is not None:
        extra += ["[[dicom.destinations]]", 'name = "PACS"', 'ae_title = "STORESCP"', 'host = "127.0.0.1"',
                  f"port = {pacs_port}"]
    return write_config(tmp_path / "pneumo.toml", tmp_path / "var", database_url=database_url, workers=False,
                        extra="\n".join(extra))


def _radiographs(directory: Path, count: int) -> list[Path]:
    """*count* small CR radiographs (256x256, 8 bit), :data:`IMAGES_PER_STUDY` to a study."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = np.linspace(0, 1, 256).reshape(256, 1)
    paths: list[Path] = []
    study = accession = ""
    for index in range(count):
        if index % IMAGES_PER_STUDY == 0:
            study, accession = generate_uid(), f"SCALE{index // IMAGES_PER_STUDY:04d}"
        brightness = 0.2 + 0.6 * (index % 17) / 16  # spread of probabilities, both labels
        pixels = np.clip(rows * brightness * 255 + np.arange(256) * 0.1, 0, 255).astype(np.uint8)
        ds = wrap_radiograph(pixels)
        ds.StudyInstanceUID, ds.AccessionNumber = study, accession
        ds.InstanceNumber = index % IMAGES_PER_STUDY + 1
        path = directory / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _receive(config: Path, tmp_path: Path, files: list[Path]) -> None:
    """The hospital's modality sends *files* to ``pneumo serve`` (workers off): *len(files)* infer
    jobs queued in PostgreSQL, none run."""
    server = ServeProcess(config, tmp_path / "serve.log").start()
    try:
        sent = subprocess.run(
            [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port),
             *map(str, files)],
            capture_output=True, text=True, check=False, timeout=300,
        )
        assert sent.returncode == 0, sent.stderr[-2000:]
    finally:
        server.terminate(60)


class WorkerProcess:
    """``pneumo worker`` started by hand (no ``--parent``), as on an extra host."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "--config", str(config), "worker"],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                self._ready.set()

    def wait_ready(self, timeout: float = 90.0) -> None:
        assert self._ready.wait(timeout), f"pneumo worker did not become ready; see {self.log_path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def _held_by(db: Database, pid: int) -> list[Job]:
    """Running jobs whose holder is process *pid* (``name@host:pid:thread``, storage.jobs)."""
    with db.read_session() as session:
        running = session.execute(select(Job).where(Job.state == JobState.RUNNING)).scalars().all()
    return [job for job in running if job.locked_by and job.locked_by.split("@", 1)[-1].split(":")[1:2] == [str(pid)]]


def _kill_mid_job(db: Database, worker: WorkerProcess, *, kind: str, timeout: float = 60.0) -> list[Job]:
    """SIGKILL *worker* while it holds a job of *kind*; returns the jobs it held when it died.

    The process is stopped (SIGSTOP) before it is looked at, so "mid-job" is a fact read from
    the database, not a race: a stopped process finishes nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(job.kind == kind for job in _held_by(db, worker.pid)):
            os.kill(worker.pid, signal.SIGSTOP)
            held = _held_by(db, worker.pid)
            if any(job.kind == kind for job in held):
                os.kill(worker.pid, signal.SIGKILL)
                worker.proc.wait(10)
                return held
            os.kill(worker.pid, signal.SIGCONT)
        time.sleep(0.005)
    raise AssertionError(f"worker {worker.pid} never held a {kind} job")


def _open_jobs(db: Database) -> int:
    with db.read_session() as session:
        return int(session.execute(
            select(func.count()).select_from(Job).where(Job.state.in_([JobState.PENDING, JobState.RUNNING]))
        ).scalar_one())


def _jobs(db: Database) -> list[Job]:
    with db.read_session() as session:
        return list(session.execute(select(Job).order_by(Job.id)).scalars())


def test_three_workers_share_postgres_and_a_killed_one_loses_nothing(
    postgres_url: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    files = _radiographs(tmp_path / "in", IMAGES)
    with StoreScp(tmp_path / "pacs" / "in") as pacs:
        config = _config(tmp_path, postgres_url, lease_seconds=LEASE_SECONDS, pacs_port=pacs.port)
        _receive(config, tmp_path, files)
        db = Database(postgres_url)
        try:
            queued = _jobs(db)
            assert [j.kind for j in queued] == [INFER_JOB] * IMAGES and all(j.state == JobState.PENDING for j in queued)

            workers += [WorkerProcess(config, tmp_path / f"worker-{n}.log") for n in range(3)]
            for worker in workers:
                worker.wait_ready()
            victim = workers[0]
            held = _kill_mid_job(db, victim, kind=INFER_JOB)
            assert not alive(victim.pid)

            # The survivors take the victim's jobs over when their lease expires, and finish the rest.
            assert wait_for(lambda: _open_jobs(db) == 0, 240, 0.5), "jobs left unfinished"
            assert all(w.proc.poll() is None for w in workers[1:]), "a surviving worker died"

            every = _jobs(db)
            by_id = {job.id: job for job in every}
            assert {j.state for j in every} == {JobState.DONE}, [(j.kind, j.state, j.last_error) for j in every
                                                                  if j.state != JobState.DONE][:5]
            for job in held:  # claimed by the victim, then again by a survivor once the lease ran out
                assert by_id[job.id].attempts >= 2, (job.kind, by_id[job.id].attempts)

            with db.read_session() as session:
                received = session.execute(
                    select(Instance.id).where(Instance.origin == InstanceOrigin.RECEIVED)
                ).scalars().all()
                results = session.execute(select(InferenceResult)).scalars().all()
                srs = session.execute(
                    select(Instance.sop_instance_uid).where(Instance.origin == InstanceOrigin.GENERATED,
                                                            Instance.sop_class_uid == SR_CLASS)
                ).scalars().all()
                delivered = session.execute(
                    select(DeliveryAttempt.job_pk, func.count()).where(
                        DeliveryAttempt.outcome == DeliveryOutcome.DELIVERED
                    ).group_by(DeliveryAttempt.job_pk)
                ).all()
            # One verdict per image, each with its SR; every image analysed (none lost, none twice).
            assert len(received) == IMAGES
            assert sorted(r.instance_pk for r in results) == sorted(received)
            assert {r.status for r in results} == {"ok"}
            assert len(srs) == len(set(srs)) == IMAGES
            assert {r.sr_instance_pk for r in results} and None not in {r.sr_instance_pk for r in results}
            # One delivery per SR, each with exactly one successful attempt on record.
            deliveries = [j for j in every if j.kind == DELIVER_JOB]
            assert sorted(j.payload["subject"] for j in deliveries) == sorted(srs)
            assert sorted(job_pk for job_pk, _ in delivered) == sorted(j.id for j in deliveries)
            assert {count for _, count in delivered} == {1}
            # ... and the PACS holds exactly those SRs.
            at_pacs = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in pacs.received()]
            assert sorted(at_pacs) == sorted(srs)
            # Work was shared: each survivor ran jobs (its log records inference results).
            for worker in workers[1:]:
                assert '"inference.result"' in worker.log_path.read_text()
        finally:
            db.dispose()
    verify = pneumo(config, "audit", "verify")  # three processes appended to one audit chain
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True, verify.stdout + verify.stderr


def _registration_of_another_host(config: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A wake-up registration written by a worker on another host sharing ``data_dir``: its PID
    (the largest Linux allows) is no process of this host."""
    with monkeypatch.context() as patched:
        patched.setattr(socket, "gethostname", lambda: "another-host")
        wake_dir = load_settings(config).wake_dir
    wake_dir.mkdir(parents=True, exist_ok=True)
    registration = wake_dir / "infer-4194304.port"
    registration.write_text("9", encoding="ascii")
    return registration


def test_a_worker_started_on_the_host_of_a_dead_one_takes_its_jobs_back_at_once(
    postgres_url: str, tmp_path: Path, workers: list[WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is far longer than the test: only the same-host orphan release can explain a finish.

    Only *this* host's dead processes count: the wake-up registration of a process on another
    host that shares the data directory survives the workers' start-up sweeps."""
    count = 20
    config = _config(tmp_path, postgres_url, lease_seconds=3600, pacs_port=None)
    _receive(config, tmp_path, _radiographs(tmp_path / "in", count))
    foreign = _registration_of_another_host(config, monkeypatch)
    db = Database(postgres_url)
    try:
        first = WorkerProcess(config, tmp_path / "worker-0.log")
        workers.append(first)
        first.wait_ready()
        held = _kill_mid_job(db, first, kind=INFER_JOB)

        second = WorkerProcess(config, tmp_path / "worker-1.log")
        workers.append(second)
        second.wait_ready()
        assert '"worker.orphans_released"' in second.log_path.read_text()
        assert wait_for(lambda: _open_jobs(db) == 0, 120, 0.5), "the dead worker's jobs were not taken back"
        by_id = {job.id: job for job in _jobs(db)}
        for job in held:
            assert by_id[job.id].state == JobState.DONE
        with db.read_session() as session:
            assert session.execute(select(func.count()).select_from(InferenceResult)).scalar_one() == count
        assert foreign.is_file(), "a worker took another host's live process for a dead one of its own"
    finally:
        db.dispose()
