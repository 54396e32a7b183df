"""``keys rotate`` logic (storage/rotation.py): a mixed store (plaintext, retired key, current key)
ends up under the current key, an interrupted run is resumed by running it again, a damaged file
is reported and left alone. The CLI (signals, audit, a SIGKILL midway): tests/gateway/test_cli_keys.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from storage.encryption import Keyring
from storage.filestore import FileStore
from storage.rotation import PLAINTEXT, rotate_store

OLD = Keyring("2025", {"2025": os.urandom(32)})
NEW = Keyring("2026", {"2026": os.urandom(32), "2025": OLD.keys["2025"]})


class StopAfter(threading.Event):
    """An Event that reports itself set after *n* looks: a deterministic "Ctrl-C after n files"."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self._left = n

    def is_set(self) -> bool:
        self._left -= 1
        return self._left < 0 or super().is_set()


def _fill(tmp_path: Path) -> dict[str, bytes]:
    """Four plaintext files, four under the retired key, two already under the current one."""
    contents: dict[str, bytes] = {}
    for index, keyring in enumerate([None] * 4 + [OLD] * 4 + [NEW] * 2):
        store = FileStore(tmp_path / "dicom", tmp_path / "tmp", fsync=False, keyring=keyring)
        relative = store.relative_path("1.2.9", f"1.2.9.{index % 3}", f"1.2.9.1.{index}")
        data = os.urandom(70_000 + index * 1000)
        store.commit(store.stage_bytes(data), relative)
        contents[relative] = data
        store.close()
    return contents


def test_dry_run_counts_by_key_and_changes_nothing(tmp_path: Path) -> None:
    contents = _fill(tmp_path)
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp", keyring=NEW)
    before = {r: store.absolute(r).read_bytes() for r in contents}
    report = rotate_store(store, dry_run=True)
    assert report.scanned == 10 and report.already_current == 2
    assert dict(report.rotated) == {PLAINTEXT: 4, "2025": 4}
    assert {r: store.absolute(r).read_bytes() for r in contents} == before
    # Without any key configured, status still counts (every encrypted file is "to rotate").
    off = rotate_store(FileStore(tmp_path / "dicom", tmp_path / "tmp"), dry_run=True)
    assert dict(off.rotated) == {"2025": 4, "2026": 2} and off.already_current == 4


def test_interrupted_rotation_resumes_where_it_stopped(tmp_path: Path) -> None:
    contents = _fill(tmp_path)
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp", keyring=NEW)
    first = rotate_store(store, stop=StopAfter(5))
    assert first.interrupted and first.scanned == 5 and not first.complete
    assert all(store.read_bytes(r) == data for r, data in contents.items())  # every file readable midway

    second = rotate_store(store)
    assert second.complete and second.scanned == 10 and second.failed == 0
    assert sum(first.rotated.values()) + sum(second.rotated.values()) == 8  # each file rewritten once
    assert second.already_current == 10 - sum(second.rotated.values())
    assert {store.key_id(r) for r in contents} == {"2026"}
    assert all(store.read_bytes(r) == data for r, data in contents.items())
    assert list((tmp_path / "tmp").iterdir()) == []

    third = rotate_store(store)
    assert third.already_current == 10 and not third.rotated  # nothing left: a rerun is a no-op


def test_damaged_file_is_reported_and_left_alone(tmp_path: Path) -> None:
    contents = _fill(tmp_path)
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp", keyring=NEW)
    victim = next(r for r in contents if store.key_id(r) == "2025")
    raw = bytearray(store.absolute(victim).read_bytes())
    raw[200] ^= 0x40
    store.absolute(victim).write_bytes(bytes(raw))
    report = rotate_store(store)
    assert report.failed == 1 and not report.complete and sum(report.rotated.values()) == 7
    assert store.absolute(victim).read_bytes() == bytes(raw) and store.key_id(victim) == "2025"


def test_rotation_waits_for_the_uid_lock_of_a_writer(tmp_path: Path) -> None:
    """An ingest holding a SOP Instance UID's lock is never overtaken: the file it decides about
    is rewritten only after the lock is released."""
    contents = _fill(tmp_path)
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp", keyring=NEW)
    target = next(r for r in contents if store.key_id(r) is None)
    sop = Path(target).stem
    done = threading.Event()
    with store.uid_lock(sop):
        def run() -> None:
            rotate_store(store)
            done.set()

        worker = threading.Thread(target=run)
        worker.start()
        assert not done.wait(1.0)  # blocked on our lock (bounded wait: it must still be blocked)
        assert store.key_id(target) is None
    worker.join(30)
    assert done.is_set() and store.key_id(target) == "2026"
