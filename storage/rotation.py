"""``pneumo keys rotate``: bring every stored file under the current key, resumably, while serving.

Rotation is a walk of the store (:func:`storage.integrity.iter_store_files`) that rewrites each
file not yet under the current key (:meth:`FileStore.reencrypt`: plaintext files are encrypted,
files under a retired key are decrypted — authenticated to their last chunk — and encrypted
again). Why it is safe to run next to ``pneumo serve`` and to kill at any moment:

* **each file atomically**: the new file is staged, fsynced, renamed over the old one and the
  directory fsynced; a kill leaves the old file or the new one, both readable with the keyring,
  and at most one ``*.part`` in the staging area (swept at the next start);
* **under the SOP Instance UID's lock** (:meth:`FileStore.uid_lock`, an ``flock`` shared with the
  acceptor processes): an ingest replacing the same instance waits, so rotation never renames
  stale bytes over newer ones, and re-reads the header once it holds the lock;
* **resumable by construction**: files already under the current key are skipped after a
  header read (~100 bytes), so running it again after an interruption continues where it stopped
  — there is no progress file to lose or to get wrong;
* **plaintext identity is kept**: the index's ``sha256``/``size`` are of the plaintext and do not
  change, so rotation touches no database row.

Readers that hold a file open while it is replaced keep reading the old inode (POSIX rename), so a
C-GET in flight is not disturbed. Serve processes must already hold the new key as current (and the
old one as retired) before rotation starts, or they keep writing under the old key.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import structlog

from storage.encryption import StoredFileIntegrityError
from storage.filestore import FileStore
from storage.integrity import iter_store_files

log = structlog.get_logger(__name__)

#: The key "id" under which plaintext files are counted.
PLAINTEXT = "plaintext"


@dataclass
class RotationReport:
    """What a rotation (or a ``--dry-run`` count) found and did."""

    current_key_id: str | None
    dry_run: bool
    scanned: int = 0
    already_current: int = 0
    #: Files rewritten (or, in a dry run, to rewrite), by the key id they were under.
    rotated: Counter[str] = field(default_factory=Counter)
    #: Files that failed authentication or could not be read: left as they are.
    failed: int = 0
    #: Files that disappeared between the walk and the rewrite (replaced or moved by an ingest).
    vanished: int = 0
    interrupted: bool = False
    elapsed_s: float = 0.0

    @property
    def complete(self) -> bool:
        """Every file is under the current key (nothing left, nothing failed)."""
        return not self.dry_run and not self.interrupted and self.failed == 0

    def as_dict(self) -> dict[str, object]:
        return {
            "current_key_id": self.current_key_id, "dry_run": self.dry_run, "scanned": self.scanned,
            "already_current": self.already_current,
            ("to_rotate" if self.dry_run else "rotated"): dict(sorted(self.rotated.items())),
            "failed": self.failed, "vanished": self.vanished, "interrupted": self.interrupted,
            "elapsed_s": round(self.elapsed_s, 1),
        }


def rotate_store(
    store: FileStore,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    progress: Callable[[RotationReport], None] | None = None,
    progress_every_s: float = 5.0,
) -> RotationReport:
    """Rewrite every file of *store* that is not under its keyring's current key.

    *dry_run*: only count, by key id, what a rotation would rewrite (works with encryption off:
    then every encrypted file counts). *stop*: set it (a signal handler) to finish the file in
    hand and return, ``interrupted``. *progress* is called at most every *progress_every_s*.
    Raises :class:`StoredFileIntegrityError` when rotating without a configured key."""
    current = store.keyring.current_id if store.keyring is not None else None
    if current is None and not dry_run:
        raise StoredFileIntegrityError("no current key is configured (storage.encryption): nothing to rotate to")
    report = RotationReport(current, dry_run)
    started = last_progress = time.monotonic()
    for relative in iter_store_files(store.root):
        if stop is not None and stop.is_set():
            report.interrupted = True
            break
        report.scanned += 1
        _one(store, relative, current, report)
        now = time.monotonic()
        if progress is not None and now - last_progress >= progress_every_s:
            report.elapsed_s = now - started
            progress(report)
            last_progress = now
    report.elapsed_s = time.monotonic() - started
    log.info("storage.keys_rotate.done", **{k: v for k, v in report.as_dict().items() if k != "current_key_id"})
    return report


def _one(store: FileStore, relative: str, current: str | None, report: RotationReport) -> None:
    try:
        key_id = store.key_id(relative)  # unlocked peek: most files are current on a rerun
        if key_id == current:
            report.already_current += 1
            return
        if report.dry_run:
            report.rotated[key_id or PLAINTEXT] += 1
            return
        with store.uid_lock(PurePosixPath(relative).stem):
            before = store.reencrypt(relative)
    except FileNotFoundError:
        report.vanished += 1
        return
    except (StoredFileIntegrityError, OSError) as exc:
        # Never logged: the path (UIDs). The reason and the count are enough to act on.
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        log.error("storage.keys_rotate.file_failed", error=exc.__class__.__name__, reason=(reason or "")[:200])
        report.failed += 1
        return
    if before == current:
        report.already_current += 1  # another rotation got there first
    else:
        report.rotated[before or PLAINTEXT] += 1
