"""The job runtime: a registry of job kinds and the worker loop that runs them.

The queue semantics live in :mod:`storage.jobs`; this is the loop around them, usable by every
part. Each job kind has exactly one handler, registered by the composition root (``gateway``);
a part raises the errors of :mod:`conf.errors` and the loop translates them by one rule:

* :class:`~conf.errors.LeaseLostError`: another worker owns the job now; drop ours silently.
* a :class:`~conf.errors.PneumoError` that is not ``retryable``: retrying cannot help, the job
  is dead-lettered at once (visible to operators, retryable by hand).
* anything else (``retryable`` errors and unexpected exceptions): retried with exponential
  backoff and jitter until the kind's ``max_attempts``, then dead-lettered.

Handlers must be idempotent (deterministic UIDs, unique result rows), because a job whose worker
died is run again once its lease expires. While a job runs, its worker renews the lease
(:class:`LeaseKeeper`), so a job may run longer than its lease without being taken over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from conf.errors import LeaseLostError, PneumoError
from conf.logging import scrub_text
from storage import jobs
from storage.db import Database
from storage.jobs import ClaimedJob

log = structlog.get_logger(__name__)


class JobHandler(Protocol):
    """Runs one job. Must call :func:`storage.jobs.complete` inside the transaction that stores
    its results and raise :class:`~conf.errors.LeaseLostError` if that returns False."""

    def __call__(self, job: ClaimedJob, worker_id: str) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base: float = 2.0
    backoff_cap: float = 600.0


@dataclass(frozen=True)
class GivesWay:
    """A job kind that waits while jobs of *to* are runnable, but never longer than *at_most*
    past its due time.

    Why: on a small machine a burst of images and the work derived from them share the CPU. The
    derived work that is not urgent — the FHIR publication of a study, which the EHR reads as a
    preliminary report — then gets out of the way of the images still waiting for analysis, and
    a study's publications coalesce (its preliminary and final versions become one when the
    study result is made before the burst ends). *at_most* bounds the wait, so a queue that never
    empties delays the publication, never starves it.
    """

    to: tuple[str, ...]
    at_most: dt.timedelta


@dataclass(frozen=True)
class JobKind:
    """One kind of job: its name in the queue, its handler, how it is retried and, optionally,
    which more urgent kinds it gives way to."""

    name: str
    handler: JobHandler
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    gives_way: GivesWay | None = None


class JobRegistry:
    """Job kind name -> :class:`JobKind`; one handler per kind, registered once."""

    def __init__(self, kinds: Iterable[JobKind] = ()) -> None:
        self._kinds: dict[str, JobKind] = {}
        for kind in kinds:
            self.register(kind)

    def register(self, kind: JobKind) -> None:
        if kind.name in self._kinds:
            raise ValueError(f"job kind {kind.name!r} is registered twice")
        self._kinds[kind.name] = kind

    def get(self, name: str) -> JobKind | None:
        return self._kinds.get(name)

    def rule(self, name: str) -> GivesWay | None:
        """The :class:`GivesWay` rule of kind *name*, if it has one."""
        kind = self._kinds.get(name)
        return None if kind is None else kind.gives_way

    @property
    def names(self) -> list[str]:
        return list(self._kinds)


@dataclass(frozen=True)
class WorkerOptions:
    poll_interval: float = 0.5
    lease_seconds: float = 300.0


#: A held lease is renewed when this fraction of it has passed: two renewals in a row may fail
#: (database briefly unreachable, a stalled process) before the lease runs out.
RENEW_FRACTION = 1 / 3


@dataclass(eq=False)
class _HeldLease:
    job_id: int
    worker_id: str
    lease: dt.timedelta
    due: float  # time.monotonic() of the next renewal

    def schedule(self) -> None:
        self.due = time.monotonic() + self.lease.total_seconds() * RENEW_FRACTION


class LeaseKeeper:
    """The heartbeat: renews the leases of the jobs being run, every third of the lease.

    A claim holds a job for ``worker.lease_seconds``; while the handler runs, this extends the
    lease to a full one again (:func:`storage.jobs.renew`, its own short transaction), so a live
    worker keeps its job however long it takes, and a dead one's job is claimable once the lease
    runs out after its last renewal. A renewal that finds the job no longer held by this worker
    (taken over after renewals failed for a whole lease, requeued, completed) stops renewing it;
    the handler's own :func:`storage.jobs.holds` / :func:`storage.jobs.complete` checks then make
    it roll back (:class:`~conf.errors.LeaseLostError`). A renewal that fails (database
    unreachable) is tried again a third of a lease later.

    One thread, started with the first job, asleep until the next renewal is due (no polling);
    :class:`JobWorker` has one of its own unless it is handed a shared one.
    """

    def __init__(self, database: Database, name: str = "lease-keeper") -> None:
        self._db = database
        self._name = name
        self._held: dict[tuple[int, str], _HeldLease] = {}
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def holding(self, job: ClaimedJob, worker_id: str, lease: dt.timedelta) -> Iterator[None]:
        """Keep the lease of *job* (claimed by *worker_id* for *lease*) renewed inside the block."""
        key = (job.id, worker_id)
        held = _HeldLease(job.id, worker_id, lease, 0.0)
        held.schedule()
        with self._changed:
            self._held[key] = held
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                if self._held.get(key) is held:
                    del self._held[key]

    @property
    def held_jobs(self) -> set[int]:
        """The ids of the jobs whose leases are being renewed."""
        with self._changed:
            return {held.job_id for held in self._held.values()}

    def stop(self, timeout: float = 10.0) -> None:
        with self._changed:
            self._stopping = True
            thread, self._thread = self._thread, None
            self._changed.notify()
        if thread is not None and thread.is_alive():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    due = [held for held in self._held.values() if held.due <= now]
                    if due:
                        break
                    soonest = min((held.due for held in self._held.values()), default=None)
                    self._changed.wait(None if soonest is None else soonest - now)
            for held in due:  # outside the condition: a renewal may wait for the job's row lock
                self._renew(held)

    def _renew(self, held: _HeldLease) -> None:
        try:
            renewed: bool | None = jobs.renew(self._db, held.job_id, held.worker_id, held.lease)
        except Exception:  # noqa: BLE001 - e.g. database briefly unreachable: try again later
            log.warning("job.lease_renewal_failed", job_id=held.job_id, exc_info=True)
            renewed = None
        with self._changed:
            key = (held.job_id, held.worker_id)
            if self._held.get(key) is not held:
                return  # the job ended meanwhile
            if renewed is False:
                del self._held[key]
                # Completed an instant ago, or lost: taken over or requeued (the handler finds out).
                log.info("job.lease_renewal_stopped", job_id=held.job_id)
            else:
                held.schedule()


def run_job(registry: JobRegistry, job: ClaimedJob, worker_id: str, database: Database) -> str:
    """Run one claimed job through its handler and book the outcome; returns what happened."""
    kind = registry.get(job.kind)
    if kind is None:  # claimed only kinds we know, so this is a programming error
        jobs.fail(database, job.id, worker_id, f"no handler for job kind {job.kind!r}", permanent=True, max_attempts=1)
        return "failed"
    try:
        kind.handler(job, worker_id)
    except LeaseLostError:
        log.warning("job.lease_lost")
        return "lease-lost"
    except Exception as exc:  # noqa: BLE001 - the one place where any handler failure is booked
        permanent = isinstance(exc, PneumoError) and not exc.retryable
        # Stored in the job row and shown to operators: no quoted values (they may be PHI).
        detail = scrub_text(str(exc) if permanent else "".join(traceback.format_exception_only(exc)).strip())
        state = jobs.fail(
            database, job.id, worker_id, detail, permanent=permanent, max_attempts=kind.retry.max_attempts,
            backoff_base=kind.retry.backoff_base, backoff_cap=kind.retry.backoff_cap,
        )
        log.warning(
            "job.dead_lettered" if state == "failed" else "job.failed",
            error=exc.__class__.__name__, detail=detail[:200], state=state, attempts=job.attempts,
        )
        return state
    log.debug("job.done", attempts=job.attempts)
    return "done"


class JobWorker:
    """One thread that claims jobs of *kinds* and runs them, until stopped."""

    def __init__(
        self, database: Database, registry: JobRegistry, kinds: list[str], options: WorkerOptions, name: str,
        *, lease_keeper: LeaseKeeper | None = None,
    ) -> None:
        """*lease_keeper*: shared by several workers of a process; by default each has its own."""
        unknown = [k for k in kinds if registry.get(k) is None]
        if unknown:
            raise ValueError(f"worker {name!r}: no handler registered for {unknown}")
        self._db = database
        self._registry = registry
        self._kinds = kinds
        self._options = options
        self._name = name
        #: The kinds of this worker that give way, and the kinds they give way to (fixed per worker).
        self._rules = {kind: rule for kind in kinds if (rule := registry.rule(kind)) is not None}
        self._gives_way_to = {k for rule in self._rules.values() for k in rule.to}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._owns_keeper = lease_keeper is None
        self._keeper = lease_keeper if lease_keeper is not None else LeaseKeeper(database, f"{name}-lease")

    @property
    def kinds(self) -> list[str]:
        return list(self._kinds)

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
        if self._owns_keeper:
            self._keeper.stop()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def claim(self, worker_id: str) -> ClaimedJob | None:
        """The next job for this worker: the most urgent of its kinds, except that a kind which
        gives way (:class:`GivesWay`) is taken, while the work it gives way to is runnable, only
        once it has waited its longest."""
        lease = dt.timedelta(seconds=self._options.lease_seconds)
        if not self._rules or not jobs.any_runnable(self._db, self._gives_way_to):
            return jobs.claim(self._db, self._kinds, worker_id, lease)
        urgent = [name for name in self._kinds if name not in self._rules]
        job = jobs.claim(self._db, urgent, worker_id, lease) if urgent else None
        for name, rule in self._rules.items():
            if job is not None:
                break
            job = jobs.claim(self._db, [name], worker_id, lease, overdue_by=rule.at_most)
        return job

    def run_once(self, worker_id: str) -> bool:
        """Claim and run one job; False when there was nothing to do."""
        job = self.claim(worker_id)
        if job is None:
            return False
        structlog.contextvars.bind_contextvars(job_id=job.id, job_kind=job.kind)
        try:
            with self._keeper.holding(job, worker_id, dt.timedelta(seconds=self._options.lease_seconds)):
                run_job(self._registry, job, worker_id, self._db)
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "job_kind")
        return True

    def _run(self) -> None:
        worker_id = jobs.worker_identity(self._name)
        while not self._stop.is_set():
            try:
                busy = self.run_once(worker_id)
            except Exception:  # noqa: BLE001 - e.g. database briefly unreachable: keep the loop alive
                log.exception("worker.claim_failed")
                busy = False
            if not busy:
                self._wake.wait(self._options.poll_interval)
                self._wake.clear()


Waker = Callable[[], None]
"""Called after a transaction committed new work, so an idle worker of this process starts at once."""
