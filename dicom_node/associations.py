"""Associations to our destinations kept open for a few seconds and reused (the SCU side).

Opening an association costs a TCP connection, A-ASSOCIATE-RQ/AC, two pynetdicom threads and an
A-RELEASE at the end: against DCMTK ``storescp`` ~21 ms of the 27 ms one report took, and half its
CPU. A result makes two objects for the same PACS (SR and summary image) and a burst makes many,
so the next object to the same destination goes over the association the last one used, as long
as it has been idle less than ``delivery.association_idle_seconds`` (Orthanc's
``DicomAssociationCloseDelay`` does the same). An association is released normally (A-RELEASE)
once idle that long, on shutdown, or after any failure on it; one the peer closed is noticed on
checkout and replaced.

At most one idle association per destination is kept: a PACS that serves one association at a
time (DCMTK ``storescp`` without ``--fork``) would otherwise wait on ours. When the next object
needs presentation contexts the idle association did not propose (a summary image after an SR),
that association is released and the new one proposes both kinds, so from then on one
association carries everything this process sends there.

An association is checked out by one thread at a time, so a delivery thread never shares one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from pynetdicom.association import Association

log = structlog.get_logger(__name__)


#: What an association proposes: (abstract syntax, transfer syntaxes) pairs, in order.
Contexts = tuple[tuple[str, tuple[str, ...]], ...]
#: PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255.
MAX_CONTEXTS = 128


@dataclass
class _Idle:
    assoc: Association
    contexts: Contexts
    since: float


def covers(proposed: Contexts, needed: Contexts) -> bool:
    """Whether an association that proposed *proposed* was asked everything *needed* asks."""
    return set(needed) <= set(proposed)


def merged(proposed: Contexts, needed: Contexts) -> Contexts:
    """*needed* first, then what *proposed* adds, if that stays within :data:`MAX_CONTEXTS`."""
    union = tuple(dict.fromkeys((*needed, *proposed)))
    return union if len(union) <= MAX_CONTEXTS else needed


def _release_quietly(assoc: Association) -> None:
    """A-RELEASE if still established (else nothing to do); never raises."""
    try:
        if assoc.is_established:
            assoc.release()
    except Exception:  # noqa: BLE001 - a peer gone bad must not fail the caller's cleanup
        assoc.abort()


class AssociationPool:
    """An idle association per key (a destination and our calling AE), released after *idle_seconds*.

    *idle_seconds* 0 keeps nothing open: every checkout opens an association and releases it at
    the end, as before pooling existed.
    """

    def __init__(self, idle_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: dict[Hashable, _Idle] = {}
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()

    @contextmanager
    def checkout(
        self, key: Hashable, contexts: Contexts, connect: Callable[[Contexts], Association]
    ) -> Iterator[tuple[Association, bool]]:
        """An established association for *key* that proposed *contexts*: the idle one
        (``reused`` True) or a new one from *connect*, which is given the contexts to propose and
        must return an established association or raise. Back to the pool after the block;
        released instead when the block raised or the association is no longer up."""
        assoc, proposed = self._take(key, contexts)
        reused = assoc is not None
        if assoc is None:
            assoc = connect(proposed)
        try:
            yield assoc, reused
        except BaseException:
            _release_quietly(assoc)
            raise
        self._give_back(key, assoc, proposed)

    def release_idle(self) -> int:
        """Release the associations idle longer than *idle_seconds* (or dropped); returns how many."""
        now = self._clock()
        expired: list[Association] = []
        with self._lock:
            for key, entry in list(self._idle.items()):
                if now - entry.since >= self._idle_seconds or not entry.assoc.is_established:
                    expired.append(entry.assoc)
                    del self._idle[key]
        for assoc in expired:
            _release_quietly(assoc)
        return len(expired)

    def close(self) -> None:
        """Release every idle association and stop the reaper (shutdown)."""
        self._closed.set()
        with self._lock:
            entries = list(self._idle.values())
            self._idle.clear()
        for entry in entries:
            _release_quietly(entry.assoc)

    @property
    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)

    def _take(self, key: Hashable, contexts: Contexts) -> tuple[Association | None, Contexts]:
        """The idle association for *key* if it can carry *contexts*, and what a new one should
        propose otherwise (*contexts* plus what the released one had proposed)."""
        with self._lock:
            entry = self._idle.pop(key, None)
        if entry is None:
            return None, contexts
        fresh = entry.assoc.is_established and self._clock() - entry.since < self._idle_seconds
        if fresh and covers(entry.contexts, contexts):
            return entry.assoc, entry.contexts
        _release_quietly(entry.assoc)  # dropped by the peer, idle too long, or not for this kind
        return None, merged(entry.contexts, contexts)

    def _give_back(self, key: Hashable, assoc: Association, contexts: Contexts) -> None:
        if self._idle_seconds <= 0 or self._closed.is_set() or not assoc.is_established:
            _release_quietly(assoc)
            return
        with self._lock:
            replaced = self._idle.pop(key, None)  # another thread's, for the same destination
            self._idle[key] = _Idle(assoc, contexts, self._clock())
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="association-reaper", daemon=True)
                self._reaper.start()
        if replaced is not None:
            _release_quietly(replaced.assoc)

    def _reap(self) -> None:
        while not self._closed.wait(max(0.05, self._idle_seconds / 2)):
            released = self.release_idle()
            if released:
                log.debug("delivery.associations_released", count=released)
