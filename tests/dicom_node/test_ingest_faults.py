"""C-STORE promises under attack and faults (docs/architecture.md §3 step 2, PS3.4 B.2.3), each
shown against a real ``pneumo serve`` process:

- disk full (a real 20 MB tmpfs as the data dir): 0xA700 on an association that stays up, no
  partial file left behind, one rate-limited log line and no traceback;
- an undefined-length sequence never closed: 0xC210 Cannot Understand, not 0xA700;
- truncated pixel data, a Pixel Data length of 0xFFFFFFF0, pixel data shorter than Rows x Columns
  declare, malformed encapsulated fragments: refused with 0xC210, nothing stored;
- the same SOP Instance UID with different bytes from 8 associations at once, over two acceptor
  processes: the file on disk always has the indexed hash.

Plus the building blocks on their own: :class:`ReceiveFile` on a device that is always full
(``/dev/full``), :class:`RateLimitedLog`, and :func:`check_dataset` on sample files
(its table tests: ``test_dataset_check.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
import structlog.testing
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from sqlalchemy.exc import OperationalError

from audit.events import AuditSource
from dicom_node.dataset_check import check_dataset
from dicom_node.errors import CannotUnderstandError, OutOfResourcesError, SopClassMismatchError
from dicom_node.ingest import Ingestor, IngestResult, Peer, RateLimitedLog, ReceivedInstance
from dicom_node.storage_scp import ReceiveFile
from storage.db import Database
from storage.filestore import FileStore
from storage.index import find_instance
from storage.migrate import upgrade
from tests.conftest import copy_with_new_uids, sample
from tests.gateway.serve_process import ServeProcess, pneumo, write_config

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
OUT_OF_RESOURCES, CANNOT_UNDERSTAND, SUCCESS = 0xA700, 0xC210, 0x0000


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def send_raw_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's bytes as they are (no re-encoding), broken ones included."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _associate(port: int) -> Association:
    ae = AE(ae_title="TESTSCU")
    ae.maximum_pdu_size = 0
    ae.add_requested_context(CTImageStorage, [EXPLICIT_LE, IMPLICIT_LE])
    ae.add_requested_context(SecondaryCaptureImageStorage, [JPEG_BASELINE])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMO")
    assert assoc.is_established, "association was not accepted"
    return assoc


def _store(assoc: Association, path: Path) -> int:
    status = assoc.send_c_store(path)
    return int(status.Status) if "Status" in status else -1


def _instances(config: Path) -> list[dict[str, Any]]:
    out = pneumo(config, "instances", "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _pixel_value_offset(data: bytes) -> int:
    """Offset of the (explicit VR little endian, OW/OB) Pixel Data length field in *data*."""
    at = data.rfind(b"\xe0\x7f\x10\x00")
    assert at > 0
    return at + 8


def _unclosed_sequence(path: Path, out: Path) -> Path:
    """Insert an undefined-length sequence with an undefined-length item before Pixel Data and
    never close either: the parser runs to the end of the data set looking for the delimiters."""
    data = path.read_bytes()
    at = data.rfind(b"\xe0\x7f\x10\x00")
    sq = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HH2sH", 0x0008, 0x1150, b"UI", 4) + b"1.2\x00"
    out.write_bytes(data[:at] + sq + item + data[at:])
    return out


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    """One file per way of lying about the pixel data (row 7) plus the unclosed sequence (row 6)."""
    work = tmp_path / "broken"
    ct = lambda **kw: copy_with_new_uids(sample("CT_small.dcm"), work, **kw)  # noqa: E731
    files: dict[str, Path] = {}
    files["unclosed-sequence"] = _unclosed_sequence(ct(), work / "unclosed.dcm")
    truncated = ct()
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 5000])
    files["truncated"] = truncated
    huge = ct()
    data = bytearray(huge.read_bytes())
    struct.pack_into("<L", data, _pixel_value_offset(bytes(data)), 0xFFFFFFF0)
    huge.write_bytes(bytes(data))
    files["length-0xFFFFFFF0"] = huge

    def taller(ds: pydicom.Dataset) -> None:
        ds.Rows = ds.Rows * 2  # the pixel data now holds half of what the header declares

    files["short-for-rows"] = ct(mutate=taller)
    jpeg = copy_with_new_uids(sample("SC_rgb_jpeg_dcmtk.dcm"), work)
    data = jpeg.read_bytes()
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    no_delimiter = work / "jpeg-no-delimiter.dcm"
    no_delimiter.write_bytes(data[:-8])
    files["fragments-without-delimiter"] = no_delimiter
    bad_item = work / "jpeg-bad-item.dcm"
    at = data.rfind(b"\xe0\x7f\x10\x00") + 12  # first item tag after the Pixel Data header
    bad_item.write_bytes(data[:at] + b"\xfe\xff\x00\xe1" + data[at + 4 :])
    files["fragment-with-wrong-tag"] = bad_item
    return files


# -- rows 6 and 7: what cannot be decoded as declared is refused with 0xC210 ------------------


@pytest.mark.slow
def test_undecodable_data_sets_are_refused_as_cannot_understand(tmp_path: Path, send_raw_files: None) -> None:
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var")
    server = ServeProcess(config, tmp_path / "serve.log").start()
    try:
        broken = _broken_files(tmp_path)
        good = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "good")
        good_jpeg = copy_with_new_uids(sample("SC_rgb_jpeg_dcmtk.dcm"), tmp_path / "good")
        assoc = _associate(server.dicom_port)
        try:
            statuses = {name: _store(assoc, path) for name, path in broken.items()}
            # The association survives every refusal and still stores good data.
            after = [_store(assoc, good), _store(assoc, good_jpeg)]
            assert assoc.is_established
        finally:
            assoc.release()
    finally:
        assert server.terminate() == 0
    assert statuses == {name: CANNOT_UNDERSTAND for name in broken}, statuses
    assert after == [SUCCESS, SUCCESS]
    stored = {row["sop_instance_uid"] for row in _instances(config)}
    assert stored == {pydicom.dcmread(good).SOPInstanceUID, pydicom.dcmread(good_jpeg).SOPInstanceUID}
    files = [p for p in (tmp_path / "var" / "dicom").rglob("*.dcm")]
    assert len(files) == 2, "nothing refused may be left in the store"


def test_pixel_check_accepts_every_sample_encoding() -> None:
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
                 "SC_rgb_jpeg_dcmtk.dcm", "image_dfl.dcm", "emri_small.dcm", "liver_1frame.dcm"):
        path = sample(name)
        with path.open("rb") as fp:
            header = pydicom.dcmread(fp, stop_before_pixels=True)
            check_dataset(fp, header)


@pytest.mark.parametrize("name", ["truncated", "length-0xFFFFFFF0", "short-for-rows",
                                  "fragments-without-delimiter", "fragment-with-wrong-tag"])
def test_pixel_check_refuses_what_cannot_be_decoded(tmp_path: Path, name: str) -> None:
    path = _broken_files(tmp_path)[name]
    with path.open("rb") as fp:
        header = pydicom.dcmread(fp, stop_before_pixels=True)
        with pytest.raises(CannotUnderstandError) as caught:
            check_dataset(fp, header)
    assert caught.value.status == CANNOT_UNDERSTAND


def test_pixel_check_refuses_an_image_without_pixel_data(tmp_path: Path) -> None:
    path = copy_with_new_uids(sample("CT_small.dcm"), tmp_path, mutate=lambda ds: ds.__delitem__("PixelData"))
    with path.open("rb") as fp:
        header = pydicom.dcmread(fp, stop_before_pixels=True)
        with pytest.raises(SopClassMismatchError) as caught:
            check_dataset(fp, header)
    assert caught.value.status == 0xA900


@pytest.fixture
def ingestor_parts(tmp_path: Path) -> Iterator[tuple[Database, FileStore]]:
    database = Database(f"sqlite:///{tmp_path / 'pneumo.db'}")
    upgrade(database)
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp", fsync=False)
    yield database, store
    store.close()
    database.dispose()


def _received(path: Path) -> ReceivedInstance:
    meta = read_file_meta_info(path)
    return ReceivedInstance(
        path=path,
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        calling=Peer("TESTSCU", "127.0.0.1", 1),
        called_ae="PNEUMO",
    )


@pytest.mark.parametrize("name", ["unclosed-sequence", "truncated-deflate"])
def test_ingest_maps_every_parser_failure_to_cannot_understand(
    tmp_path: Path, name: str, ingestor_parts: tuple[Database, FileStore]
) -> None:
    """pydicom ends an unclosed sequence with a bare ``OSError`` ("No tag to read") and a cut
    deflate stream with ``zlib.error``: both are about the bytes, so 0xC210, never 0xA700."""
    if name == "unclosed-sequence":
        path = _broken_files(tmp_path)[name]
    else:
        path = tmp_path / "deflated.dcm"
        data = sample("image_dfl.dcm").read_bytes()
        path.write_bytes(data[: len(data) - 400])
    database, store = ingestor_parts
    ingestor = Ingestor(database, store, AuditSource("PNEUMO@test"), local_host=None)
    with pytest.raises(CannotUnderstandError) as caught:
        ingestor.ingest(_received(path))
    assert caught.value.status == CANNOT_UNDERSTAND
    assert list((tmp_path / "dicom").rglob("*.dcm")) == []


def test_failed_replace_puts_the_stored_file_back(
    tmp_path: Path, ingestor_parts: tuple[Database, FileStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``on_conflict = "replace"`` renames the new bytes in before the index commit; when that
    commit fails the stored copy is renamed back, so the file still has the indexed hash."""
    database, store = ingestor_parts
    ingestor = Ingestor(database, store, AuditSource("PNEUMO@test"), local_host=None, on_conflict="replace")
    uid, study, series = generate_uid(), generate_uid(), generate_uid()
    first, second = (
        copy_with_new_uids(sample("CT_small.dcm"), tmp_path / str(n), study_uid=study, series_uid=series,
                           sop_uid=uid, mutate=lambda ds, n=n: setattr(ds, "ImageComments", f"variant {n}"))
        for n in range(2)
    )
    assert ingestor.ingest(_received(first)) is IngestResult.STORED

    def database_gone(*args: object, **kwargs: object) -> None:
        raise OperationalError("UPDATE", {}, Exception("disk I/O error"))

    monkeypatch.setattr("dicom_node.ingest.append_audit", database_gone)
    with pytest.raises(OutOfResourcesError):
        ingestor.ingest(_received(second))
    with database.read_session() as session:
        row = find_instance(session, uid)
        assert row is not None
        indexed, path = row.sha256, store.absolute(row.path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == indexed
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no set-aside copy left behind"


def test_replace_rejudges_in_its_own_transaction_or_not_at_all(
    tmp_path: Path, ingestor_parts: tuple[Database, FileStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replacement's revision, re-queued ``infer`` job and armed study result commit with it:
    a failed commit leaves none of them (and the old file); a committed one leaves all of them —
    here for a replacement that also moves the instance to another study, whose old file goes."""
    from sqlalchemy import select

    from storage.models import Job, JobState

    database, store = ingestor_parts
    ingestor = Ingestor(database, store, AuditSource("PNEUMO@test"), local_host=None, on_conflict="replace")
    uid, study, other_study = generate_uid(), generate_uid(), generate_uid()
    first = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "0", study_uid=study, sop_uid=uid)
    moved = copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "1", study_uid=other_study, sop_uid=uid,
                               mutate=lambda ds: setattr(ds, "ImageComments", "corrected"))
    assert ingestor.ingest(_received(first)) is IngestResult.STORED
    with database.session() as session:  # as if the worker had judged it
        [infer] = session.execute(select(Job).where(Job.kind == "infer")).scalars().all()
        infer.state = JobState.DONE

    def jobs_and_revision() -> tuple[dict[str, str], int, str]:
        with database.read_session() as session:
            jobs = {job.dedup_key: job.state for job in session.execute(select(Job)).scalars()}
            row = find_instance(session, uid)
            assert row is not None
            return jobs, row.revision, row.path

    before = jobs_and_revision()
    with monkeypatch.context() as patched:
        patched.setattr("dicom_node.ingest.append_audit", _database_gone)
        with pytest.raises(OutOfResourcesError):
            ingestor.ingest(_received(moved))
    assert jobs_and_revision() == before  # nothing re-queued, no revision, same place
    assert store.absolute(before[2]).is_file() and not list((tmp_path / "dicom" / other_study).rglob("*.dcm"))

    assert ingestor.ingest(_received(moved)) is IngestResult.REPLACED
    jobs, revision, path = jobs_and_revision()
    assert revision == 1 and jobs[f"infer:{uid}"] == JobState.PENDING
    assert jobs[f"study-result:{study}"] == jobs[f"study-result:{other_study}"] == JobState.PENDING
    assert f"/{other_study}/" in f"/{path}" and not store.absolute(before[2]).exists()  # moved, old copy gone
    assert ingestor.ingest(_received(moved)) is IngestResult.DUPLICATE
    assert jobs_and_revision() == (jobs, 1, path)  # the same bytes again: nothing more


def _database_gone(*args: object, **kwargs: object) -> None:
    raise OperationalError("UPDATE", {}, Exception("disk I/O error"))


def test_ingest_refuses_new_bytes_below_the_free_space_floor(tmp_path: Path) -> None:
    """``storage.min_free_mb``: below the floor a new instance is 0xA700 and nothing is placed."""
    database = Database(f"sqlite:///{tmp_path / 'pneumo.db'}")
    upgrade(database)
    store = FileStore(tmp_path / "dicom", tmp_path / "tmp", fsync=False, min_free_bytes=2**62)
    try:
        ingestor = Ingestor(database, store, AuditSource("PNEUMO@test"), local_host=None)
        with pytest.raises(OutOfResourcesError) as caught:
            ingestor.ingest(_received(copy_with_new_uids(sample("CT_small.dcm"), tmp_path / "in")))
        assert caught.value.status == OUT_OF_RESOURCES
        assert list((tmp_path / "dicom").rglob("*.dcm")) == []
        assert [p for p in (tmp_path / "tmp").iterdir() if p.is_file()] == []
    finally:
        store.close()
        database.dispose()


# -- row 8: concurrent senders of one SOP Instance UID never leave the loser's bytes --------------


@pytest.mark.slow
def test_concurrent_different_bytes_for_one_uid_keep_file_and_index_in_step(
    tmp_path: Path, send_raw_files: None
) -> None:
    rounds, senders = 6, 8
    config = write_config(
        tmp_path / "pneumo.toml", tmp_path / "var", dicom_extra='acceptor_processes = 2\non_conflict = "keep"'
    )
    server = ServeProcess(config, tmp_path / "serve.log").start()
    uids: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()
    try:
        for round_no in range(rounds):
            uid, study, series = generate_uid(), generate_uid(), generate_uid()
            uids.append(uid)
            variants = [
                copy_with_new_uids(
                    sample("CT_small.dcm"), tmp_path / f"r{round_no}" / str(n),
                    study_uid=study, series_uid=series, sop_uid=uid,
                    mutate=lambda ds, n=n: setattr(ds, "ImageComments", f"variant {n}"),
                )
                for n in range(senders)
            ]
            assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in variants}) == senders
            associations = [_associate(server.dicom_port) for _ in range(senders)]
            barrier = threading.Barrier(senders)

            def send(assoc: Association, path: Path, barrier: threading.Barrier = barrier) -> None:
                barrier.wait(30)
                status = _store(assoc, path)
                with lock:
                    statuses.append(status)

            threads = [threading.Thread(target=send, args=pair) for pair in zip(associations, variants, strict=True)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            for assoc in associations:
                assoc.release()
    finally:
        assert server.terminate() == 0
    # Policy "keep": the first commit wins, the others are told Success and audited as conflicts.
    assert statuses == [SUCCESS] * (rounds * senders)
    rows = {row["sop_instance_uid"]: row for row in _instances(config)}
    assert sorted(rows) == sorted(uids)
    for uid in uids:
        on_disk = hashlib.sha256(Path(rows[uid]["path"]).read_bytes()).hexdigest()
        assert on_disk == rows[uid]["sha256"], f"round of {uid}: file on disk differs from the index"


# -- row 4: a full disk answers 0xA700 and keeps the association --------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 20 MB tmpfs (needs root / CAP_SYS_ADMIN; skipped elsewhere)."""
    mount_point = tmp_path / "var"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount_point)], capture_output=True, check=False
    ) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the ReceiveFile unit test covers the write path")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _free(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _big_ct(directory: Path, megabytes: int) -> Path:
    """A valid CT image of about *megabytes* MB (16-bit native pixels)."""

    def enlarge(ds: pydicom.Dataset) -> None:
        side = int((megabytes * 2**20 / 2) ** 0.5)
        ds.Rows = ds.Columns = side
        ds.PixelData = os.urandom(side * side * 2)

    return copy_with_new_uids(sample("CT_small.dcm"), directory, mutate=enlarge)


@pytest.mark.slow
def test_full_disk_answers_out_of_resources_and_keeps_the_association(
    tmp_path: Path, tiny_disk: Path, send_raw_files: None
) -> None:
    # The shipped two acceptor processes; no free-space floor, so the disk really fills.
    config = write_config(
        tmp_path / "pneumo.toml", tiny_disk, dicom_extra="acceptor_processes = 2", extra="[storage]\nmin_free_mb = 0"
    )
    server = ServeProcess(config, tmp_path / "serve.log").start()
    files = [_big_ct(tmp_path / "in", 6) for _ in range(12)]
    try:
        assoc = _associate(server.dicom_port)
        try:
            statuses, free_before = [], []
            for path in files:
                free_before.append(_free(tiny_disk))
                statuses.append(_store(assoc, path))
            assert assoc.is_established, "the association must survive a full disk"
            echo = assoc.send_c_echo()
            assert int(echo.Status) == SUCCESS
        finally:
            assoc.release()
        leftovers = [p for p in (tiny_disk / "tmp").iterdir() if p.is_file()]
        free_after = _free(tiny_disk)
    finally:
        assert server.terminate() == 0
    stored = statuses.count(SUCCESS)
    assert stored >= 1 and statuses == [SUCCESS] * stored + [OUT_OF_RESOURCES] * (len(files) - stored), statuses
    assert leftovers == [], "a partial receive file must be removed at once"
    # The refused transfers gave their space back: free space is what the last success left
    # (less a few audit records), not a partial 6 MB file less.
    assert free_after > free_before[stored] - 2**20, "the space of the partial file must be given back"
    log = (tmp_path / "serve.log").read_text()
    assert log.count("dicom.store.out_of_resources") == 1, "one rate-limited line for all refusals"
    assert "Traceback" not in log


# -- the building blocks -------------------------------------------------------------------------


def test_receive_file_swallows_a_full_device_and_removes_the_partial_file(tmp_path: Path) -> None:
    receive = ReceiveFile(delete=False, mode="wb", suffix=".dcm", dir=str(tmp_path))
    receive.write(b"\x00" * 128 + b"DICM")
    assert Path(receive.name).exists() and receive.error is None
    os.dup2(os.open("/dev/full", os.O_WRONLY), receive._fd)  # every further write: ENOSPC
    assert receive.write(b"x" * 70_000) == 70_000  # no exception reaches pynetdicom's reactor
    receive.file.flush()
    assert receive.error is not None and receive.error.errno == 28  # ENOSPC
    assert not Path(receive.name).exists(), "the partial file is removed at the first failure"
    assert receive.write(b"more") == 4
    receive.close()
    receive.close()


def test_receive_file_that_cannot_be_created_still_takes_the_data_set(tmp_path: Path) -> None:
    receive = ReceiveFile(delete=False, mode="wb", suffix=".dcm", dir=str(tmp_path / "missing"))
    assert receive.error is not None
    assert receive.write(b"abc") == 3
    receive.close()


def test_rate_limited_log_emits_one_line_per_interval() -> None:
    now = [0.0]
    limited = RateLimitedLog("test.repeating", interval=60.0, clock=lambda: now[0])
    with structlog.testing.capture_logs() as lines:  # whatever the process's logging set-up
        emitted = [limited.error(detail="disk full") for _ in range(100)]
        assert emitted.count(True) == 1
        now[0] = 61.0
        assert limited.error(detail="disk full") is True
    assert [line["suppressed"] for line in lines if line["event"] == "test.repeating"] == [0, 99]
