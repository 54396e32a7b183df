"""The DICOM file store: every write is atomic and durable before anyone is told it happened.

Files live at ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``; all three names are
validated UIDs, so no peer-supplied value can steer a path. A write goes to a temporary file on
the same file system, is fsynced, renamed into place and the directory fsynced (POSIX rename
atomicity): a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from storage.uids import validate_uid

_COPY_CHUNK = 1 << 20


class FileStoreError(OSError):
    """A file could not be stored durably."""


@dataclass(frozen=True)
class StagedFile:
    """Bytes in the staging area, not yet part of the store.

    ``digest`` and ``synced`` may still be running in the store's I/O threads: hashing reads the
    file from the page cache while the disk writes it back, and both overlap with whatever the
    caller does meanwhile (parsing the header, looking the UID up). ``sha256`` waits for it."""

    path: Path
    digest: Future[str] | str
    synced: Future[None] | None = None

    @property
    def sha256(self) -> str:
        return self.digest if isinstance(self.digest, str) else self.digest.result()


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size: int
    sha256: str


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class FileStore:
    def __init__(self, root: Path, tmp_dir: Path, *, fsync: bool = True, sync_threads: int = 16) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        self.fsync = fsync
        self._syncer = ThreadPoolExecutor(max_workers=sync_threads, thread_name_prefix="fsync")
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return "/".join(
            (
                validate_uid(study_uid, "StudyInstanceUID"),
                validate_uid(series_uid, "SeriesInstanceUID"),
                validate_uid(sop_uid, "SOPInstanceUID") + ".dcm",
            )
        )

    def absolute(self, relative_path: str) -> Path:
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise FileStoreError(errno.EINVAL, "path escapes the file store", relative_path)
        return path

    def stage_copy(self, source: Path) -> StagedFile:
        """Bring *source* into the staging area and hash it.

        A hard link costs nothing when *source* is on the same file system (pynetdicom's receive
        file, when the process temp dir is our tmp dir); otherwise the bytes are copied once.
        """
        staged = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            os.link(source, staged)
            synced = self._syncer.submit(_fsync_file, staged) if self.fsync else None
            return StagedFile(staged, self._syncer.submit(sha256_file, staged), synced)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            hasher = hashlib.sha256()
            with source.open("rb") as src, staged.open("xb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    hasher.update(chunk)
                    dst.write(chunk)
            digest = hasher.hexdigest()
        return StagedFile(staged, digest)

    def stage_bytes(self, data: bytes) -> StagedFile:
        staged = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        with staged.open("xb") as handle:
            handle.write(data)
        return StagedFile(staged, hashlib.sha256(data).hexdigest())

    def commit(self, staged_file: StagedFile, relative_path: str) -> StoredFile:
        """fsync the staged file, rename it to *relative_path* and fsync the directory."""
        staged = staged_file.path
        target = self.absolute(relative_path)
        try:
            if staged_file.synced is not None:
                staged_file.synced.result()
            elif self.fsync:
                _fsync_file(staged)
            self._ensure_dir(target.parent)
            size = staged.stat().st_size
            os.replace(staged, target)
            if self.fsync:
                fsync_dir(target.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise FileStoreError(exc.errno or errno.EIO, f"could not store file: {exc.strerror}") from exc
        return StoredFile(relative_path, size, staged_file.sha256)

    def close(self) -> None:
        self._syncer.shutdown(wait=True)

    def discard(self, staged_file: StagedFile) -> None:
        with contextlib.suppress(FileNotFoundError):
            staged_file.path.unlink()

    def _ensure_dir(self, directory: Path) -> None:
        """Create *directory* (and parents) and make the new entries durable."""
        if directory.is_dir():
            return
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        directory.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            for created in reversed(missing):
                fsync_dir(created.parent)

    def sweep_staging(self) -> int:
        """Empty the staging directory at start-up: whatever is there belongs to transfers that
        were never acknowledged (our ``*.part`` files and the network layer's receive files)."""
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_file():
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
                    removed += 1
        return removed
