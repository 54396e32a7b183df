"""Group commit: messages that arrive on several connections at once share one transaction.

An acknowledgement may only leave once its message is committed, and on a real disk the commit
(the fsync) dominates what storing one order costs. When eight interfaces send at once, each
waiting for its own commit serialises them behind the disk; letting whichever thread is
committing take everything that queued meanwhile turns eight commits into one, and each sender
still gets its ACK only after the commit that holds its message.

Leader/follower, no extra thread: the first thread to submit becomes the leader and applies the
batch it finds (its own item, plus whatever queued while the previous batch was committing); the
others wait on their slot. When the leader's batch is done it hands the lead to the oldest
waiting item, if any, and returns. With one connection there is never anything to batch, and the
path is a plain call with no hand-over. A batch that fails as a whole (one bad message, a
duplicate that raced in from another process) is retried item by item, each in its own
transaction, so one message's failure is never another's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Slot(Generic[Item, Result]):
    __slots__ = ("item", "result", "error", "finished", "lead", "wake")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.lead = False
        self.wake = threading.Event()

    def outcome(self) -> Result:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class GroupCommit(Generic[Item, Result]):
    """Apply submitted items in batches, one transaction per batch (see the module docstring).

    *apply_batch* applies several items in one transaction and returns their results in order, or
    raises (then nothing of the batch may be committed); *apply_one* applies one item in its own
    transaction. Both run on the submitting threads, one batch at a time.
    """

    def __init__(
        self,
        apply_batch: Callable[[Sequence[Item]], list[Result]],
        apply_one: Callable[[Item], Result],
        *,
        max_batch: int = 64,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._apply_batch = apply_batch
        self._apply_one = apply_one
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Slot[Item, Result]] = []
        self._leading = False

    def submit(self, item: Item) -> Result:
        """Apply *item* (with whatever else is queued) and return its result once committed."""
        slot: _Slot[Item, Result] = _Slot(item)
        with self._lock:
            self._queue.append(slot)
            if not self._leading:
                self._leading = slot.lead = True
        while not slot.lead:
            slot.wake.wait()
            slot.wake.clear()
            if slot.finished:
                return slot.outcome()
        self._lead_until_done(slot)
        return slot.outcome()

    def _lead_until_done(self, own: _Slot[Item, Result]) -> None:
        """Apply batches until *own* is finished, then pass the lead on (or drop it)."""
        while not own.finished:
            with self._lock:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
            self._run(batch)
            for slot in batch:
                if slot is not own:
                    slot.wake.set()
        with self._lock:
            if self._queue:
                successor = self._queue[0]
                successor.lead = True
                successor.wake.set()
            else:
                self._leading = False

    def _run(self, batch: list[_Slot[Item, Result]]) -> None:
        if len(batch) > 1:
            try:
                results = self._apply_batch([slot.item for slot in batch])
            except Exception as error:  # noqa: BLE001 - retried item by item below, each with its own outcome
                log.warning("hl7.group_commit_split", items=len(batch), error=type(error).__name__)
            else:
                for slot, result in zip(batch, results, strict=True):
                    slot.result, slot.finished = result, True
                return
        for slot in batch:
            try:
                slot.result = self._apply_one(slot.item)
            except BaseException as error:  # noqa: BLE001 - handed to the submitting thread, which re-raises it
                slot.error = error
            slot.finished = True
