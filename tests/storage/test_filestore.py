from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import threading
import zlib
from pathlib import Path

import pytest

from storage.filestore import FileStore, FileStoreError
from storage.uids import InvalidUidError, derive_uid, is_valid_uid


def test_commit_places_file_atomically(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp")
    staged = store.stage_bytes(b"DICM-bytes")
    rel = store.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    stored = store.commit(staged, rel)
    assert store.absolute(rel).read_bytes() == b"DICM-bytes"
    assert stored.size == 10 and len(stored.sha256) == 64
    assert not staged.path.exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_stage_copy_hashes_what_it_copies(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp")
    source = tmp_path / "incoming.bin"
    source.write_bytes(b"x" * 3_000_000)
    staged = store.stage_copy(source)
    import hashlib

    assert staged.sha256 == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    store.discard(staged)
    assert not staged.path.exists()


@pytest.mark.parametrize("bad", ["../etc", "1.2.3/../../x", "1..2", "01.2", "", "1.2.a", "1" * 65, "1.2.3 "])
def test_paths_only_from_valid_uids(tmp_path: Path, bad: str) -> None:
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp")
    with pytest.raises(InvalidUidError):
        store.relative_path(bad, "1.2", "1.3")


def test_absolute_refuses_escape(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp")
    with pytest.raises(FileStoreError):
        store.absolute("../../outside.dcm")


def test_sweep_removes_leftovers(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp")
    (tmp_path / "tmp" / "abc.part").write_bytes(b"half")
    (tmp_path / "tmp" / "tmpxyz.dcm").write_bytes(b"half")
    assert store.sweep_staging() == 2


def test_derived_uids_are_deterministic_and_valid() -> None:
    a = derive_uid("sr", "1.2.3", "model", "1.0.0")
    assert a == derive_uid("sr", "1.2.3", "model", "1.0.0")
    assert a != derive_uid("sr", "1.2.3", "model", "1.0.1")
    assert is_valid_uid(a) and a.startswith("2.25.")


# -- free space (storage.min_free_mb) and the per-UID lock ------------------------------------


def test_disk_space_reports_free_bytes_against_the_floor(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp", min_free_bytes=1)
    space = store.disk_space()
    stats = os.statvfs(tmp_path)
    assert abs(space.free_bytes - stats.f_bavail * stats.f_frsize) < 64 * 2**20
    assert space.ok and space.min_free_bytes == 1
    store.require_space()  # above the floor: nothing happens


def test_require_space_refuses_below_the_floor(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp", min_free_bytes=2**62)
    assert not store.disk_space().ok
    with pytest.raises(FileStoreError) as caught:
        store.require_space()
    assert caught.value.errno == errno.ENOSPC
    FileStore(tmp_path / "dicom", tmp_path / "tmp", min_free_bytes=0).require_space()  # 0 = off


def test_uid_lock_excludes_other_threads(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp")
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def holder() -> None:
        with store.uid_lock("1.2.3.4"):
            inside.set()
            release.wait(10)
            order.append("holder-out")

    def waiter() -> None:
        with store.uid_lock("1.2.3.4"):
            order.append("waiter-in")

    first = threading.Thread(target=holder)
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=waiter)
    second.start()
    second.join(0.3)
    assert second.is_alive(), "the second thread must wait for the lock"
    release.set()
    first.join(10)
    second.join(10)
    assert order == ["holder-out", "waiter-in"]


def test_uid_lock_excludes_other_processes(tmp_path: Path) -> None:
    def try_lock(lock_file: str, result: multiprocessing.Queue[bool]) -> None:  # type: ignore[type-arg]
        fd = os.open(lock_file, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            result.put(True)
        except BlockingIOError:
            result.put(False)
        finally:
            os.close(fd)

    store = FileStore(tmp_path / "dicom", tmp_path / "tmp")
    uid = "1.2.840.99.7"
    lock_file = str(tmp_path / "dicom" / ".locks" / f"{zlib.crc32(uid.encode()) % 256:02x}.lock")
    context = multiprocessing.get_context("fork")
    result: multiprocessing.Queue[bool] = context.Queue()  # type: ignore[type-arg]
    with store.uid_lock(uid):
        child = context.Process(target=try_lock, args=(lock_file, result))
        child.start()
        child.join(30)
        assert result.get(timeout=10) is False, "another process must not get the lock while it is held"
    child = context.Process(target=try_lock, args=(lock_file, result))
    child.start()
    child.join(30)
    assert result.get(timeout=10) is True


def test_lock_files_stay_out_of_the_staging_area_and_are_bounded(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp")
    for n in range(1000):
        with store.uid_lock(f"1.2.3.{n}"):
            pass
    assert list((tmp_path / "tmp").iterdir()) == []
    assert len(list((tmp_path / "dicom" / ".locks").iterdir())) <= 256
