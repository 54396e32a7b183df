"""Objects we generate (SR, summary image) become stored instances like received ones.

A generated object is placed in the file store *before* the transaction that indexes it commits.
Its UIDs are deterministic (derived from the source instance and the model version), so a job
that runs twice — its worker died after placing the file but before committing — rewrites the
same file under the same UID and never creates a second object.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from storage.filestore import FileStore
from storage.index import add_instance, find_instance
from storage.metadata import extract_metadata
from storage.models import Instance, InstanceOrigin


@dataclass(frozen=True)
class GeneratedObject:
    dataset: Dataset
    relative_path: str
    size: int
    sha256: str


def encode(dataset: Dataset) -> bytes:
    """The Part 10 file bytes of *dataset* (with its file meta information)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def place_generated(store: FileStore, dataset: Dataset) -> GeneratedObject:
    """Stage, fsync and rename a generated object into the store (before its transaction)."""
    relative = store.relative_path(dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
    stored = store.commit(store.stage_bytes(encode(dataset)), relative)
    return GeneratedObject(dataset, relative, stored.size, stored.sha256)


def index_generated(session: Session, item: GeneratedObject) -> Instance:
    """Index *item* (or refresh the row a previous run of the same job left)."""
    existing = find_instance(session, item.dataset.SOPInstanceUID)
    if existing is not None:
        existing.sha256 = item.sha256
        existing.size = item.size
        return existing
    return add_instance(
        session,
        extract_metadata(item.dataset),
        transfer_syntax_uid=str(item.dataset.file_meta.TransferSyntaxUID),
        relative_path=item.relative_path,
        size=item.size,
        sha256=item.sha256,
        origin=InstanceOrigin.GENERATED,
        calling_ae=None,
    )
