"""The DICOM file store: every write is atomic and durable before anyone is told it happened.

Files live at ``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``; all three names are
validated UIDs, so no peer-supplied value can steer a path. A write goes to a temporary file on
the same file system, is fsynced, renamed into place and the directory fsynced (POSIX rename
atomicity): a crash leaves either the old file or the new one, never a torn one.

Two more promises, both behind the C-STORE guarantee of docs/architecture.md §3 step 2:

- :meth:`FileStore.uid_lock` serialises every writer of one SOP Instance UID, across threads and
  the acceptor processes that share the store, so that the file at a UID's path is always the one
  whose hash the index holds (never a losing concurrent sender's bytes);
- :meth:`FileStore.disk_space` reports free space against the configured floor
  (``storage.min_free_mb``), for readiness and for refusing new instances (0xA700) before the
  disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from storage.uids import validate_uid

_COPY_CHUNK = 1 << 20
#: Lock stripes: UIDs hash onto this many lock files, so the lock directory stays bounded and no
#: lock file is ever deleted (deleting one under a waiter is the classic flock race).
_LOCK_STRIPES = 256


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

    def wait(self) -> None:
        """Wait for the background hash and fsync; raises what they raised (``OSError``).

        Callers do this before taking a UID lock, so that a slow disk is never waited on by
        someone holding the lock."""
        _ = self.sha256
        if self.synced is not None:
            self.synced.result()


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DiskSpace:
    """Free space where the store writes, against the configured floor."""

    free_bytes: int
    min_free_bytes: int

    @property
    def ok(self) -> bool:
        return self.free_bytes >= self.min_free_bytes


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on *path*'s file system (``f_bavail``)."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


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
    def __init__(
        self,
        root: Path,
        tmp_dir: Path,
        *,
        fsync: bool = True,
        sync_threads: int = 16,
        min_free_bytes: int = 0,
    ) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self._syncer = ThreadPoolExecutor(max_workers=sync_threads, thread_name_prefix="fsync")
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Beside the UID directories; a dot name is never a UID, and store walks skip dot names.
        self._lock_dir = self.root / ".locks"
        self._lock_dir.mkdir(exist_ok=True)

    def disk_space(self) -> DiskSpace:
        """Free space for the store, the least of the store's and the staging area's file
        systems (received data sets land in the staging area first). One ``statvfs`` each:
        cheap enough for every C-STORE and every readiness probe."""
        free = free_bytes(self.root)
        if self.tmp_dir.stat().st_dev != self.root.stat().st_dev:
            free = min(free, free_bytes(self.tmp_dir))
        return DiskSpace(free, self.min_free_bytes)

    def require_space(self) -> None:
        """Raise :class:`FileStoreError` (ENOSPC) when free space is below the floor.

        Refusing at the floor, rather than at the last byte, leaves room for the database and the
        audit log, so work already acknowledged (results, deliveries) can still commit."""
        if self.min_free_bytes <= 0:
            return
        space = self.disk_space()
        if not space.ok:
            raise FileStoreError(
                errno.ENOSPC,
                f"free space {space.free_bytes // 2**20} MiB is below the floor of {space.min_free_bytes // 2**20} MiB",
            )

    @contextlib.contextmanager
    def uid_lock(self, sop_instance_uid: str) -> Iterator[None]:
        """Hold the write lock of *sop_instance_uid* (exclusive ``flock`` on a striped lock file).

        ``flock`` locks belong to an open file description, and every acquisition opens the file
        anew, so the lock excludes other threads of this process as well as other processes
        (the acceptor processes share the store). The kernel drops it if the holder dies.
        Whoever decides what the file at a UID's path becomes — look-up, rename, index commit —
        does it inside this lock.
        """
        stripe = zlib.crc32(sop_instance_uid.encode("ascii", "replace")) % _LOCK_STRIPES
        fd = os.open(self._lock_dir / f"{stripe:02x}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

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

    def set_aside(self, relative_path: str) -> Path | None:
        """Keep the file now at *relative_path* reachable under a second name (a hard link in
        the same directory, so it never crosses file systems), for :meth:`restore` should the
        replacement's index commit fail. ``None`` when there is no file. The ``.orig`` suffix is
        not ``.dcm``, so store walks never take a leftover (after a crash) for an instance."""
        target = self.absolute(relative_path)
        aside = target.with_name(f"{target.name}.{uuid.uuid4().hex}.orig")
        try:
            os.link(target, aside)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FileStoreError(exc.errno or errno.EIO, f"could not keep the stored file: {exc.strerror}") from exc
        return aside

    def restore(self, aside: Path, relative_path: str) -> None:
        """Put a file kept by :meth:`set_aside` back at *relative_path* (atomic rename)."""
        target = self.absolute(relative_path)
        os.replace(aside, target)
        if self.fsync:
            fsync_dir(target.parent)

    def close(self) -> None:
        self._syncer.shutdown(wait=True)

    def discard(self, staged_file: StagedFile) -> None:
        self.discard_path(staged_file.path)

    def discard_path(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

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
