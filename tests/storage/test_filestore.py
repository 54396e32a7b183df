from __future__ import annotations

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
