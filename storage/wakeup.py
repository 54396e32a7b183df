"""Wake idle job workers in other processes of this host the moment new work is committed.

Job workers poll the queue (``worker.poll_interval``, 0.5 s by default); inside one process the
code that commits work also wakes them directly (:data:`storage.runtime.Waker`). With the workers
in their own processes (``worker.processes``), an image received by an acceptor would wait for
the next poll — up to half a second on the C-STORE → report path. This module carries the wake
across processes.

How: each listening process binds a UDP socket on the loopback interface and registers it as a
file ``<directory>/<topic>-<pid>.port`` holding the port number. A sender sends one empty
datagram to every registered port of the topic. Datagrams, because a wake is a hint, never a
promise: when one is lost, full or late, the worker still finds the job at its next poll, so
nothing here can lose or duplicate work, and a sender never blocks on a slow or dead listener.
UDP on loopback rather than a Unix socket because a socket path is limited to 108 bytes and the
data directory can be anywhere. Any local process could send a datagram too: all it can cause is
an early poll.

Registrations of processes that are gone (a SIGKILLed worker) are removed by the next listener
that starts and skipped by senders (their datagrams go nowhere).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from storage.processes import process_alive

log = structlog.get_logger(__name__)

#: Topics: new ``infer`` jobs (an image was stored); new ``deliver`` jobs (a report was queued).
INFER = "infer"
DELIVER = "deliver"

_LOOPBACK = "127.0.0.1"
#: How long a sender trusts its list of registered listeners before reading the directory again.
_REFRESH_SECONDS = 1.0


class WakeListener:
    """Calls *on_wake* (on its own thread) whenever a datagram for *topic* arrives."""

    def __init__(self, directory: Path, topic: str, on_wake: Callable[[], None]) -> None:
        self._directory = directory
        self._topic = topic
        self._on_wake = on_wake
        self._sock: socket.socket | None = None
        self._registration: Path | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        _remove_stale(self._directory)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((_LOOPBACK, 0))
        sock.settimeout(0.5)  # so that stop() is noticed
        self._sock = sock
        registration = self._directory / f"{self._topic}-{os.getpid()}.port"
        temporary = registration.with_suffix(".tmp")
        temporary.write_text(str(sock.getsockname()[1]), encoding="ascii")
        temporary.replace(registration)  # a sender never reads a half-written port
        self._registration = registration
        self._thread = threading.Thread(target=self._run, name=f"wake-{self._topic}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._registration is not None:
            self._registration.unlink(missing_ok=True)
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                self._sock.recv(64)
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.1)
                continue
            self._on_wake()


class WakeSender:
    """Sends a wake for a topic to every process registered for it (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._ports: dict[str, list[int]] = {}
        self._read_at: dict[str, float] = {}
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def notify(self, topic: str) -> None:
        """Wake the listeners of *topic*; never raises, never blocks."""
        for port in self._listeners(topic):
            try:
                self._sock.sendto(b"", (_LOOPBACK, port))
            except OSError as exc:  # a full buffer (already woken), a listener just gone
                if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENOBUFS):
                    log.debug("wakeup.send_failed", topic=topic, error=exc.__class__.__name__)

    def close(self) -> None:
        self._sock.close()

    def _listeners(self, topic: str) -> list[int]:
        now = time.monotonic()
        with self._lock:
            if now - self._read_at.get(topic, float("-inf")) < _REFRESH_SECONDS:
                return self._ports.get(topic, [])
            ports: list[int] = []
            for path in self._directory.glob(f"{topic}-*.port"):
                try:
                    ports.append(int(path.read_text(encoding="ascii")))
                except (OSError, ValueError):
                    continue  # removed meanwhile, or not ours
            self._ports[topic], self._read_at[topic] = ports, now
            return ports


def _remove_stale(directory: Path) -> None:
    """Remove the registrations of processes that no longer exist (killed without stop())."""
    for path in directory.glob("*-*.port"):
        try:
            pid = int(path.stem.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not process_alive(pid):
            path.unlink(missing_ok=True)
