"""A generic job worker: claim, run the handler, complete or fail — in a loop, in a thread.

The queue semantics live in :mod:`storage.jobs`; this is only the loop around them. Handlers
are idempotent (deterministic UIDs, unique result rows), because a job whose worker died is run
again once its lease expires.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from storage import jobs
from storage.db import Database
from storage.jobs import ClaimedJob

log = structlog.get_logger(__name__)


class PermanentJobError(Exception):
    """Retrying cannot help (bad input): the job is dead-lettered at once."""


class LeaseLostError(Exception):
    """Another worker took the job over; this worker's results must be rolled back."""


@dataclass(frozen=True)
class WorkerOptions:
    poll_interval: float = 0.5
    lease_seconds: float = 300.0
    max_attempts: int = 5
    backoff_base: float = 2.0
    backoff_cap: float = 600.0


JobHandler = Callable[[ClaimedJob, str], None]
"""Runs one job. Must call ``storage.jobs.complete(session, job.id, worker_id)`` inside the
transaction that stores its results, and raise :class:`LeaseLostError` if that returns False."""


def worker_identity(name: str) -> str:
    return f"{name}@{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class JobWorker:
    def __init__(self, database: Database, kinds: list[str], handler: JobHandler, options: WorkerOptions, name: str) -> None:
        self._db = database
        self._kinds = kinds
        self._handler = handler
        self._options = options
        self._name = name
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Skip the poll wait (new work was just committed in this process)."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def run_once(self, worker_id: str) -> bool:
        """Claim and run one job; False when there was nothing to do."""
        job = jobs.claim(self._db, self._kinds, worker_id, dt.timedelta(seconds=self._options.lease_seconds))
        if job is None:
            return False
        structlog.contextvars.bind_contextvars(job_id=job.id, job_kind=job.kind)
        try:
            self._handler(job, worker_id)
            log.debug("job.done", attempts=job.attempts)
        except LeaseLostError:
            log.warning("job.lease_lost")
        except PermanentJobError as exc:
            jobs.fail(self._db, job.id, worker_id, str(exc), permanent=True, max_attempts=self._options.max_attempts)
            log.warning("job.dead_lettered", error=str(exc)[:200])
        except Exception as exc:  # noqa: BLE001 - any other failure is retried with backoff
            state = jobs.fail(
                self._db, job.id, worker_id, "".join(traceback.format_exception_only(exc)).strip(),
                permanent=False, max_attempts=self._options.max_attempts,
                backoff_base=self._options.backoff_base, backoff_cap=self._options.backoff_cap,
            )
            log.warning("job.failed", error=exc.__class__.__name__, detail=str(exc)[:200], state=state, attempts=job.attempts)
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "job_kind")
        return True

    def _run(self) -> None:
        worker_id = worker_identity(self._name)
        while not self._stop.is_set():
            try:
                busy = self.run_once(worker_id)
            except Exception:  # noqa: BLE001 - e.g. database briefly unreachable: keep the loop alive
                log.exception("worker.claim_failed")
                busy = False
            if not busy:
                self._wake.wait(self._options.poll_interval)
                self._wake.clear()
