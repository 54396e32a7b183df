"""Cross-process wake-ups (storage/wakeup.py): real loopback UDP sockets, real processes."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from storage.wakeup import DELIVER, INFER, WakeListener, WakeSender

#: A child that listens for INFER wakes and prints one line per wake (then exits after two).
_CHILD = """
import sys, threading
from pathlib import Path
from storage.wakeup import INFER, WakeListener
woken = threading.Semaphore(0)
listener = WakeListener(Path(sys.argv[1]), INFER, woken.release)
listener.start()
print("ready", flush=True)
for _ in range(2):
    if not woken.acquire(timeout=30):
        sys.exit(3)
    print("woken", flush=True)
listener.stop()
"""


def _started(directory: Path, topic: str) -> tuple[WakeListener, threading.Semaphore]:
    woken = threading.Semaphore(0)
    listener = WakeListener(directory, topic, woken.release)
    listener.start()
    return listener, woken


def test_a_wake_reaches_every_listener_of_its_topic_only(tmp_path: Path) -> None:
    first, first_woken = _started(tmp_path, INFER)
    second, second_woken = _started(tmp_path, INFER)  # same process, second registration replaces the file
    other, other_woken = _started(tmp_path, DELIVER)
    sender = WakeSender(tmp_path)
    try:
        sender.notify(INFER)
        assert second_woken.acquire(timeout=5)
        assert not other_woken.acquire(timeout=0.3)
        sender.notify(DELIVER)
        assert other_woken.acquire(timeout=5)
    finally:
        for listener in (first, second, other):
            listener.stop()
        sender.close()
    assert not list(tmp_path.glob("*.port")), "a stopped listener removes its registration"


def test_a_wake_crosses_processes(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    sender = WakeSender(tmp_path)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for _ in range(2):
            sender.notify(INFER)
            assert child.stdout.readline().strip() == "woken"
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
        sender.close()


def test_nobody_listening_is_not_an_error(tmp_path: Path) -> None:
    sender = WakeSender(tmp_path / "absent")
    sender.notify(INFER)  # no directory, no listener: nothing happens, nothing raises
    (tmp_path / "infer-1.port").write_text("not a port")
    WakeSender(tmp_path).notify(INFER)
    sender.close()


def test_registrations_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / f"{INFER}-{int(dead.stdout)}.port"
    stale.write_text("9")  # the discard port: a wake sent there goes nowhere
    listener, _ = _started(tmp_path, INFER)
    try:
        assert not stale.exists()
        assert len(list(tmp_path.glob(f"{INFER}-*.port"))) == 1
    finally:
        listener.stop()
