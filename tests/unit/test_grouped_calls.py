"""GroupedCalls: concurrent callers share calls, each hears its own outcome, nobody waits forever."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.domain.grouped_calls import GroupedCalls


class HeldWrites:
    """A write function that records its groups and holds the first write until released."""

    def __init__(self):
        self.groups: list[list[int]] = []
        self.first_started = threading.Event()
        self.release_first = threading.Event()

    def __call__(self, items: list[int]) -> list:
        self.groups.append(list(items))
        if len(self.groups) == 1:
            self.first_started.set()
            assert self.release_first.wait(10)
        return [ValueError(f"bad {item}") if item < 0 else item * 10 for item in items]


def wait_for_waiting(group: GroupedCalls, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(group._waiting) < count:
        assert time.monotonic() < deadline, "callers did not queue up"
        time.sleep(0.005)


def test_an_idle_caller_writes_alone_at_once():
    writes = HeldWrites()
    writes.release_first.set()
    group = GroupedCalls(writes)
    assert group.run(4) == 40
    assert writes.groups == [[4]]


def test_callers_arriving_during_a_write_share_the_next_one_and_get_their_own_outcomes():
    writes = HeldWrites()
    group = GroupedCalls(writes)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(group.run, 1)
        assert writes.first_started.wait(10)
        rest = {item: pool.submit(group.run, item) for item in (2, 3, -4, 5)}
        wait_for_waiting(group, 4)
        writes.release_first.set()
        assert first.result(10) == 10
        assert {item: future.exception(10) is None for item, future in rest.items()} == {
            2: True, 3: True, -4: False, 5: True}
        assert [rest[item].result() for item in (2, 3, 5)] == [20, 30, 50]
        with pytest.raises(ValueError, match="bad -4"):
            rest[-4].result()
    # One write for the first caller, one for the four that queued behind it.
    assert writes.groups[0] == [1] and sorted(writes.groups[1]) == [-4, 2, 3, 5] and len(writes.groups) == 2


def test_a_failed_write_fails_its_whole_group_and_the_next_group_is_still_written():
    calls = []
    release = threading.Event()

    def write(items):
        calls.append(list(items))
        if len(calls) == 1:
            assert release.wait(10)
        if len(calls) == 2:
            raise ConnectionError("database down")
        return items

    group = GroupedCalls(write)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(group.run, "a")
        while not calls:
            time.sleep(0.005)
        doomed = [pool.submit(group.run, item) for item in ("b", "c")]
        wait_for_waiting(group, 2)
        release.set()
        assert first.result(10) == "a"
        for future in doomed:
            with pytest.raises(ConnectionError):
                future.result(10)
    assert group.run("d") == "d"  # the group is free again
    assert group._in_flight == 0 and not group._waiting


def test_many_threads_each_get_their_own_item_back():
    group = GroupedCalls(lambda items: list(items))
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(group.run, range(2000)))
    assert results == list(range(2000))
    assert group._in_flight == 0 and not group._waiting


def test_up_to_max_in_flight_callers_run_at_once_and_the_rest_share_the_next_calls():
    started, release = [], threading.Event()

    def handle(items):
        started.append(list(items))
        assert release.wait(10)
        return items

    group = GroupedCalls(handle, max_in_flight=2)
    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(group.run, item) for item in ("a", "b")]
        while len(started) < 2:
            time.sleep(0.005)
        queued = [pool.submit(group.run, item) for item in ("c", "d", "e")]
        wait_for_waiting(group, 3)
        release.set()
        assert [future.result(10) for future in running + queued] == ["a", "b", "c", "d", "e"]
    assert sorted(map(sorted, started[:2])) == [["a"], ["b"]]
    assert sorted(item for call in started[2:] for item in call) == ["c", "d", "e"]
    assert group._in_flight == 0 and not group._waiting
