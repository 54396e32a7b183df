"""Rebuild the index from the file store (``pneumo db reindex``).

The file store is the durable truth of what was received: each file is a complete Part 10
object at a path named by its own UIDs. When the database was lost (deleted, emptied, damaged
and moved aside), walking the store gives back the patient/study/series/instance rows, and an
``infer`` job for every received image brings back its result, SR and study result — under the
same UIDs as before, since those derive from the source instance and the model
(docs/architecture.md §3 step 4). What cannot come back: the audit records and the delivery
history of the lost database, and who sent each instance (``calling_ae`` stays empty).

Nothing is deleted or moved. Files already indexed are skipped, so the rebuild can be repeated
and also picks up the files a crash left unindexed. Unreadable or misplaced files are counted
and left where they are for an operator to look at.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from storage.db import Database
from storage.encryption import StoredFileIntegrityError
from storage.filestore import FileStore
from storage.index import add_instance
from storage.integrity import iter_store_files
from storage.job_kinds import INFER_JOB, infer_job_key
from storage.jobs import enqueue
from storage.metadata import MetadataError, extract_metadata
from storage.models import Instance, InstanceOrigin

log = structlog.get_logger(__name__)

#: Files indexed per transaction: large enough to be quick, small enough that an interrupted
#: rebuild loses little (it is repeatable anyway).
BATCH = 200


@dataclass
class ReindexReport:
    files: int = 0
    already_indexed: int = 0
    indexed_received: int = 0
    indexed_generated: int = 0
    jobs_queued: int = 0
    unreadable: int = 0
    misplaced: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Found:
    relative_path: str
    dataset: Dataset
    size: int
    sha256: str
    mtime: dt.datetime


def reindex(database: Database, store: FileStore, *, is_generated: Callable[[Dataset], bool]) -> ReindexReport:
    """Index every store file the database does not know; queue ``infer`` for received ones.

    *is_generated* tells our own objects (SR, summary image) from received ones — the composition
    root knows what the report builders produce; they get no ``infer`` job."""
    report = ReindexReport()
    batch: list[str] = []
    for relative in iter_store_files(store.root):
        report.files += 1
        batch.append(relative)
        if len(batch) >= BATCH:
            _index_batch(database, store, batch, report, is_generated)
            batch = []
    if batch:
        _index_batch(database, store, batch, report, is_generated)
    log.info("storage.reindexed", **report.as_dict())
    return report


def _index_batch(
    database: Database, store: FileStore, paths: list[str], report: ReindexReport, is_generated: Callable[[Dataset], bool]
) -> None:
    with database.read_session() as session:
        known = set(session.execute(select(Instance.path).where(Instance.path.in_(paths))).scalars())
    report.already_indexed += len(known)
    found = [item for path in paths if path not in known and (item := _read(store, path, report)) is not None]
    if not found:
        return
    with database.session() as session:
        for item in found:
            meta = extract_metadata(item.dataset)
            if session.execute(select(Instance.id).where(Instance.sop_instance_uid == meta.sop_instance_uid)).first():
                report.already_indexed += 1  # indexed under another path: leave the row alone
                continue
            generated = is_generated(item.dataset)
            instance = add_instance(
                session,
                meta,
                transfer_syntax_uid=str(item.dataset.file_meta.TransferSyntaxUID),
                relative_path=item.relative_path,
                size=item.size,
                sha256=item.sha256,
                origin=InstanceOrigin.GENERATED if generated else InstanceOrigin.RECEIVED,
                calling_ae=None,
                received_at=item.mtime,
            )
            if generated:
                report.indexed_generated += 1
            else:
                report.indexed_received += 1
                enqueue(session, INFER_JOB, infer_job_key(meta.sop_instance_uid), instance_pk=instance.id)
                report.jobs_queued += 1


def _read(store: FileStore, relative: str, report: ReindexReport) -> _Found | None:
    path: Path = store.absolute(relative)
    try:
        with store.open(relative) as handle:  # authenticated and decrypted when encrypted
            dataset = dcmread(handle, stop_before_pixels=True)
        meta = extract_metadata(dataset)
        dataset.file_meta.TransferSyntaxUID  # noqa: B018 - a Part 10 file has one; fail here if not
        stat = path.stat()
        digest, size = store.digest(relative)  # of the plaintext, as ingest indexes it
    except (InvalidDicomError, MetadataError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            StoredFileIntegrityError):
        report.unreadable += 1
        return None
    if store.relative_path(meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid) != relative:
        report.misplaced += 1  # its UIDs do not name this path: not ours to index
        return None
    return _Found(relative, dataset, size, digest, dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC))
