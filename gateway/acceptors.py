"""Supervised child processes of ``pneumo serve``: extra DICOM acceptors and the job workers.

Extra DICOM acceptor processes (``dicom.acceptor_processes`` > 1):

pynetdicom handles every PDU in Python, so the associations of one process share one GIL: on a
2-core node, 4 associations into one process ingest slower than 2 into each of 2 processes
(measured: 22 vs 37 instances/s). ``pneumo serve`` therefore starts N-1 children that bind the
same port with SO_REUSEPORT and run only the DICOM node (ingest and Q/R); the parent keeps the
HTTP server and the workers, which pick up the children's jobs from the shared database.

A child exits when told to (SIGTERM, forwarded by the parent's graceful stop) or when its parent
disappears (SIGKILL of the parent): it polls its parent PID, finishes in-flight associations and
stops, so a crashed gateway never leaves orphan listeners on the port.

Worker processes (``worker.processes`` > 0) run the job workers (``pneumo worker --parent``) out of
the acceptor's process for the same reason: a result (SR, summary image, FHIR projection,
deliveries) holds the GIL for ~200 ms of Python work, and in one process the results of a burst
and the C-STOREs of the next images took turns on one core while the other idled (docs/
benchmarks.md). Images queued by any acceptor wake them across processes (:mod:`storage.wakeup`).

A child that dies on its own (killed, out of memory, a crash in a native library) is restarted
by a supervisor thread in the parent, after an exponential backoff so that a child that cannot
start does not spin: 1 s, 2 s, 4 s ... up to a minute; a child that stayed up for a minute
counts as healthy again and its next death starts the backoff over. Until its replacement says
ready the process set is degraded, and ``/ready`` says so (``acceptors``), so that an operator
or an orchestrator sees the lost capacity instead of a silently shrunken gateway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Delays between restarts of a child that keeps dying."""

    base_seconds: float = 1.0
    cap_seconds: float = 60.0
    #: A child up for this long has recovered: its next death waits only ``base_seconds``.
    healthy_after_seconds: float = 60.0

    def delay(self, consecutive_failures: int) -> float:
        """Seconds to wait before the restart that follows the *consecutive_failures*-th death."""
        exponent = max(0, consecutive_failures - 1)
        return float(min(self.cap_seconds, self.base_seconds * 2 ** min(exponent, 32)))


@dataclass
class _Slot:
    """One child position: the current process, and how its restarts are going."""

    index: int
    process: subprocess.Popen[str] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0
    failures: int = 0
    restarts: int = 0
    restart_at: float | None = None


class ChildProcesses:
    """*count* children running ``pneumo <command...>`` with *config*, restarted when they die.

    Each child prints one ``{"event": "ready"}`` line on stdout when it serves; *log_prefix* names
    its log lines (``<prefix>_died``, ``<prefix>_restarted``, ...).
    """

    def __init__(
        self,
        config: Path | None,
        count: int,
        command: list[str],
        *,
        log_prefix: str,
        env: dict[str, str] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._config = config
        self._command = command
        self._env = dict(env or {})
        self._log_prefix = log_prefix
        self._slots = [_Slot(index) for index in range(count)]
        self._backoff = backoff or Backoff()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the children, wait until each one listens, then supervise them."""
        for slot in self._slots:
            self._spawn(slot)
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            if not _wait_ready(slot, deadline - time.monotonic()):
                self.stop()
                raise RuntimeError(f"a child process ({' '.join(self._command)}) did not start (see its log lines)")
        self._supervisor = threading.Thread(target=self._supervise, name=f"{self._log_prefix}-supervisor", daemon=True)
        self._supervisor.start()
        log.info(f"{self._log_prefix}_children_started", processes=len(self._slots))

    @property
    def running(self) -> bool:
        """True when every child is alive and listening (False while one is being restarted)."""
        with self._lock:
            return all(_alive(slot) and slot.ready.is_set() for slot in self._slots)

    def health(self) -> dict[str, int]:
        """Counts for logs and diagnostics: children wanted, listening, restarts so far."""
        with self._lock:
            return {
                "processes": len(self._slots),
                "listening": sum(1 for s in self._slots if _alive(s) and s.ready.is_set()),
                "restarts": sum(s.restarts for s in self._slots),
            }

    def pids(self) -> list[int]:
        with self._lock:
            return [s.process.pid for s in self._slots if s.process is not None]

    def stop(self, grace_seconds: float = 40.0) -> None:
        """SIGTERM every child and wait for it (a worker finishes its job, an acceptor its
        associations), then end the supervisor. In that order: a worker child started by the
        supervisor thread dies with that thread (``PR_SET_PDEATHSIG`` follows the creating thread),
        so ending the thread first would SIGKILL it in the middle of a graceful stop."""
        self._stopping.set()
        self._terminate(grace_seconds)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(10)
        self._terminate(grace_seconds)  # one the supervisor restarted while we stopped the others

    def _terminate(self, grace_seconds: float) -> None:
        with self._lock:
            children = [s.process for s in self._slots if s.process is not None]
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(10)

    # -- supervision --------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        env = {**os.environ, **self._env, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "gateway.cli"]
        if self._config is not None:
            command += ["--config", str(self._config)]
        ready = threading.Event()
        child = subprocess.Popen([*command, *self._command, "--parent", str(os.getpid())],
                                 stdout=subprocess.PIPE, text=True, env=env)
        with self._lock:
            slot.process, slot.ready, slot.started_at, slot.restart_at = child, ready, time.monotonic(), None
        name = f"{self._log_prefix}-{slot.index}-out"
        reader = threading.Thread(target=_read_ready, args=(child, ready), name=name, daemon=True)
        reader.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            for slot in self._slots:
                try:
                    self._tend(slot)
                except OSError as exc:  # e.g. no memory or PIDs to fork: try again after the backoff
                    slot.failures += 1
                    slot.restart_at = time.monotonic() + self._backoff.delay(slot.failures)
                    log.error(f"{self._log_prefix}_restart_failed", child=slot.index, error=exc.__class__.__name__)

    def _tend(self, slot: _Slot) -> None:
        now = time.monotonic()
        if slot.restart_at is not None:
            if now >= slot.restart_at and not self._stopping.is_set():
                slot.restarts += 1
                self._spawn(slot)
                log.info(f"{self._log_prefix}_restarted", child=slot.index, restarts=slot.restarts)
            return
        assert slot.process is not None
        code = slot.process.poll()
        if code is None:
            return
        if now - slot.started_at >= self._backoff.healthy_after_seconds:
            slot.failures = 0
        slot.failures += 1
        delay = self._backoff.delay(slot.failures)
        with self._lock:
            slot.restart_at = now + delay
            slot.ready.clear()
        log.error(f"{self._log_prefix}_died", child=slot.index, exit_code=code, restart_in_seconds=delay,
                  consecutive_failures=slot.failures)


class AcceptorProcesses(ChildProcesses):
    """``dicom.acceptor_processes - 1`` extra DICOM acceptors on *port* (SO_REUSEPORT)."""

    def __init__(self, config: Path | None, port: int, count: int, *, backoff: Backoff | None = None) -> None:
        super().__init__(config, count, ["acceptor"], log_prefix="dicom.acceptor",
                         env={"PNEUMO_DICOM__PORT": str(port)}, backoff=backoff)


class WorkerProcesses(ChildProcesses):
    """``worker.processes`` children running the job workers (``pneumo worker --parent``)."""

    def __init__(self, config: Path | None, count: int, *, backoff: Backoff | None = None) -> None:
        super().__init__(config, count, ["worker"], log_prefix="worker.process", backoff=backoff)


def _alive(slot: _Slot) -> bool:
    return slot.process is not None and slot.process.poll() is None


def _read_ready(child: subprocess.Popen[str], ready: threading.Event) -> None:
    """Drain the child's stdout (so it never blocks on a full pipe); set *ready* on its ready line."""
    assert child.stdout is not None
    for line in child.stdout:
        try:
            if json.loads(line).get("event") == "ready":
                ready.set()
        except (ValueError, AttributeError):
            continue


def _wait_ready(slot: _Slot, timeout: float) -> bool:
    deadline = time.monotonic() + max(0.0, timeout)
    while not slot.ready.wait(0.1):
        if not _alive(slot) or time.monotonic() > deadline:
            return False
    return _alive(slot)


def parent_alive(parent_pid: int) -> bool:
    """True while the process that started us is still our parent."""
    return os.getppid() == parent_pid


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process the moment its parent dies (``PR_SET_PDEATHSIG``).

    For worker children: a job a child holds is released at the next start only when the PID that
    claimed it is gone (:func:`storage.jobs.release_orphans`). A child that outlived a SIGKILLed
    parent by even a second, finishing its job, could keep that job claimed past the restart
    until its lease expired; dying with the parent is what a SIGKILL of an in-process worker
    did. Elsewhere than Linux the child's parent polling (one second) is all there is.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("worker.pdeathsig_unavailable", errno=ctypes.get_errno())
