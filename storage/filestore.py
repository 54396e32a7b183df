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

Encryption at rest (:mod:`storage.encryption`) lives here and nowhere else: with a
:class:`~storage.encryption.Keyring` every file is written encrypted under the current key, and
every reader goes through :meth:`FileStore.open` / :meth:`FileStore.read_bytes`, which
authenticate and decrypt (or pass a plaintext file through). Without a keyring the write path is
exactly the unencrypted one (a hard link, hashing in the I/O threads): encryption off costs the
ingest hot path nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from storage.encryption import (
    MAGIC,
    EncryptingWriter,
    Header,
    Keyring,
    StoredFileIntegrityError,
    decrypt_stream,
    encrypt_stream,
    plaintext_size,
    read_header,
)
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
    synced: Future[Any] | None = None
    #: Written encrypted (its size on disk is not the plaintext's).
    encrypted: bool = False

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


def _plaintext_size(path: Path) -> int:
    with path.open("rb") as handle:
        header: Header | None = read_header(handle)
        if header is None:
            raise StoredFileIntegrityError("the staged file is not encrypted")
        return plaintext_size(os.fstat(handle.fileno()).st_size, header)


def is_encrypted(path: Path) -> bool:
    """Whether the file at *path* starts with the encryption magic (tests, diagnostics)."""
    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


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
        keyring: Keyring | None = None,
    ) -> None:
        self.root = root
        self.keyring = keyring
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
        With encryption on, the one pass that reads *source* encrypts it into the staging file and
        hashes the plaintext, then fsyncs — all in the I/O threads, as the hash and fsync are
        without it.
        """
        staged = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        if self.keyring is not None:
            job = self._syncer.submit(self._encrypt_file, source, staged, self.keyring)
            return StagedFile(staged, job, job, encrypted=True)
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
            if self.keyring is None:
                handle.write(data)
                return StagedFile(staged, hashlib.sha256(data).hexdigest())
            writer = EncryptingWriter(handle, self.keyring)
            writer.write(data)
            return StagedFile(staged, writer.finish(), encrypted=True)

    def _encrypt_file(self, source: Path, staged: Path, keyring: Keyring) -> str:
        """(I/O thread) Encrypt *source* into *staged*, fsync it; the plaintext's SHA-256."""
        with source.open("rb") as src, staged.open("xb") as dst:
            digest, _ = encrypt_stream(src, dst, keyring)
            if self.fsync:
                dst.flush()
                os.fsync(dst.fileno())
        return digest

    # -- reading: the one way any part reads a stored file -------------------------------------

    def open(self, relative_path: str) -> BinaryIO:
        """The stored file's plaintext bytes, as a seekable binary file; close it after use.

        A plaintext file is returned as the open file itself (no copy). An encrypted one is
        authenticated and decrypted completely before anything is returned — so truncation,
        reordering or tampering anywhere in the file raise
        :class:`~storage.encryption.StoredFileIntegrityError` here and no reader ever acts on
        unverified bytes — into memory, chunk by chunk (the plaintext is held once; every current
        reader parses the whole data set anyway). Raises ``FileNotFoundError`` / ``OSError`` as
        opening a file does."""
        path = self.absolute(relative_path)
        handle = path.open("rb")
        try:
            header = read_header(handle)
            if header is None:
                return handle
            plain = io.BytesIO()
            decrypt_stream(handle, plain.write, self._require_keyring(), header)
        except BaseException:
            handle.close()
            raise
        handle.close()
        plain.seek(0)
        return plain

    def read_bytes(self, relative_path: str) -> bytes:
        """The stored file's plaintext bytes, authenticated (see :meth:`open`)."""
        with self.open(relative_path) as handle:
            if isinstance(handle, io.BytesIO):
                return handle.getvalue()
            return handle.read()

    def digest(self, relative_path: str) -> tuple[str, int]:
        """(SHA-256 hex, size) of the stored file's plaintext — what the index holds — streaming,
        without holding the file in memory."""
        path = self.absolute(relative_path)
        with path.open("rb") as handle:
            header = read_header(handle)
            if header is None:
                return hashlib.file_digest(handle, "sha256").hexdigest(), os.fstat(handle.fileno()).st_size
            hasher = hashlib.sha256()
            size = decrypt_stream(handle, hasher.update, self._require_keyring(), header)
            return hasher.hexdigest(), size

    def key_id(self, relative_path: str) -> str | None:
        """The key id the stored file is encrypted under, or None when it is plaintext."""
        with self.absolute(relative_path).open("rb") as handle:
            header = read_header(handle)
        return None if header is None else header.key_id

    def reencrypt(self, relative_path: str) -> str | None:
        """Rewrite the stored file under the current key, atomically; returns the key id it was
        under before (None: plaintext), or the current id when there was nothing to do.

        The caller holds :meth:`uid_lock` of the file's SOP Instance UID (``pneumo keys rotate``
        does), so no ingest decides what the path becomes meanwhile. The new file is staged,
        fsynced, renamed over the old one and the directory fsynced — a crash leaves the old or
        the new file, both readable — and it is only renamed once the old file authenticated to
        its last chunk. Readers holding the old file open keep reading it (POSIX rename)."""
        keyring = self._require_keyring()
        target = self.absolute(relative_path)
        staged = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with target.open("rb") as src:
                header = read_header(src)
                if header is not None and header.key_id == keyring.current_id:
                    return keyring.current_id
                with staged.open("xb") as dst:
                    writer = EncryptingWriter(dst, keyring)
                    if header is None:
                        while data := src.read(_COPY_CHUNK):
                            writer.write(data)
                    else:
                        decrypt_stream(src, writer.write, keyring, header)
                    writer.finish()
                    if self.fsync:
                        dst.flush()
                        os.fsync(dst.fileno())
            os.replace(staged, target)
            if self.fsync:
                fsync_dir(target.parent)
        finally:
            self.discard_path(staged)
        return None if header is None else header.key_id

    def _require_keyring(self) -> Keyring:
        if self.keyring is None:
            raise StoredFileIntegrityError(
                "the stored file is encrypted but no key is configured (storage.encryption)"
            )
        return self.keyring

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
            size = _plaintext_size(staged) if staged_file.encrypted else staged.stat().st_size
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
        if staged_file.encrypted and staged_file.synced is not None:
            # The I/O thread may not have created the file yet: wait, so it is not left behind.
            with contextlib.suppress(Exception):
                staged_file.synced.result()
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
