"""hl7.group_commit: items submitted while a batch commits share the next transaction.

Real threads throughout. A gate inside ``apply_one`` holds the first (leader's) transaction open
so that the others queue behind it deterministically; then they must be applied as one batch, each
submitter must get its own result, a batch that fails must be retried item by item (the bad
item's error to its submitter alone), and the lead must pass on so that nobody waits forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest

from hl7.group_commit import GroupCommit
from tests.conftest import wait_until

WAIT = 10.0


class Recorder:
    """A store that records its transactions: each a list of items, committed or not."""

    def __init__(self, *, fail_on: Callable[[int], bool] = lambda item: False) -> None:
        self.transactions: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self._fail_on = fail_on
        self._lock = threading.Lock()

    def apply_batch(self, items: Sequence[int]) -> list[str]:
        if any(self._fail_on(item) for item in items):
            raise RuntimeError("one item of the batch is bad: nothing of it is committed")
        with self._lock:
            self.transactions.append(list(items))
        return [f"ack-{item}" for item in items]

    def apply_one(self, item: int) -> str:
        self.entered.set()
        assert self.gate.wait(WAIT)
        if self._fail_on(item):
            raise ValueError(f"item {item} is bad")
        with self._lock:
            self.transactions.append([item])
        return f"ack-{item}"


Outcomes = tuple[dict[int, str], dict[int, BaseException]]


def start_submitters(commits: GroupCommit[int, str], items: Sequence[int]) -> tuple[list[threading.Thread], Outcomes]:
    """One thread per item, each submitting it; results and errors by item."""
    results: dict[int, str] = {}
    errors: dict[int, BaseException] = {}

    def run(item: int) -> None:
        try:
            results[item] = commits.submit(item)
        except BaseException as error:  # noqa: BLE001 - recorded for the assertions
            errors[item] = error

    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    return threads, (results, errors)


def join_all(threads: Sequence[threading.Thread]) -> None:
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), "a submitter never got its result"


def queue_behind_leader(store: Recorder, commits: GroupCommit[int, str], followers: Sequence[int]) -> Outcomes:
    """Item 0 leads and is held inside its transaction while *followers* queue; then all go on."""
    store.gate.clear()
    leader, (lead_results, lead_errors) = start_submitters(commits, [0])
    assert store.entered.wait(WAIT)
    threads, (results, errors) = start_submitters(commits, followers)
    # Every follower queued (waiting on its slot) while the leader is still held in its transaction.
    wait_until(lambda: len(commits._queue) == len(followers), WAIT, "the followers to queue")  # noqa: SLF001
    store.gate.set()
    join_all([*leader, *threads])
    assert lead_results == {0: "ack-0"} and not lead_errors
    return results, errors


def test_one_submitter_is_a_plain_call() -> None:
    store = Recorder()
    commits = GroupCommit(store.apply_batch, store.apply_one)
    assert [commits.submit(item) for item in (1, 2, 3)] == ["ack-1", "ack-2", "ack-3"]
    assert store.transactions == [[1], [2], [3]]


def test_items_queued_during_a_commit_share_the_next_transaction() -> None:
    store = Recorder()
    commits = GroupCommit(store.apply_batch, store.apply_one)
    results, errors = queue_behind_leader(store, commits, range(1, 8))
    assert not errors
    assert results == {item: f"ack-{item}" for item in range(1, 8)}
    assert store.transactions[0] == [0]
    assert sorted(store.transactions[1]) == list(range(1, 8)), "the queued items were not committed together"
    assert len(store.transactions) == 2


def test_batches_are_capped() -> None:
    store = Recorder()
    commits = GroupCommit(store.apply_batch, store.apply_one, max_batch=3)
    results, errors = queue_behind_leader(store, commits, range(1, 8))
    assert not errors and len(results) == 7
    assert [len(t) for t in store.transactions] == [1, 3, 3, 1]


def test_a_failing_batch_is_retried_item_by_item() -> None:
    store = Recorder(fail_on=lambda item: item == 4)
    commits = GroupCommit(store.apply_batch, store.apply_one)
    results, errors = queue_behind_leader(store, commits, range(1, 8))
    assert set(errors) == {4} and isinstance(errors[4], ValueError)
    assert results == {item: f"ack-{item}" for item in (1, 2, 3, 5, 6, 7)}
    # The failed batch committed nothing; then each item alone.
    assert sorted(store.transactions[1:]) == [[item] for item in (1, 2, 3, 5, 6, 7)]


def test_many_submitters_all_answered_exactly_once() -> None:
    store = Recorder()
    commits = GroupCommit(store.apply_batch, store.apply_one)
    threads, (results, errors) = start_submitters(commits, range(200))
    join_all(threads)
    assert not errors
    assert results == {item: f"ack-{item}" for item in range(200)}
    committed = sorted(item for transaction in store.transactions for item in transaction)
    assert committed == list(range(200))
    # Nothing left leading: the next submitter is served at once.
    assert commits.submit(999) == "ack-999"


def test_max_batch_must_be_positive() -> None:
    store = Recorder()
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommit(store.apply_batch, store.apply_one, max_batch=0)
