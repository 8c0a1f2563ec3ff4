"""Concurrent callers' items handled in one call (group commit, grouped reads), each caller answered on its own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class _Waiting:
    """One caller's item, and what came of it."""

    item: Any
    turn: threading.Event = field(default_factory=threading.Event)
    leads: bool = False
    outcome: Any = None
    error: BaseException | None = None


class GroupedCalls:
    """Handle items in groups: what arrives while `max_in_flight` calls are running forms the next group.

    No caller waits for a timer. A caller that finds fewer than `max_in_flight` calls running
    makes one at once (alone, if the server is idle, so a quiet server answers as fast as
    without grouping, and a few concurrent callers still overlap their round trips); callers
    that arrive while all are busy queue up, and when a call ends the first of them makes one
    call for all of them. Under load a group costs about one call: a gateway busy with submits
    makes one database round trip and one commit per group, not per submit (group commit), and
    one busy with polls one read per group. A caller's item is handled by a call that starts
    after the caller arrived, so nothing it gets back is older than its request.

    `handle(items)` returns one outcome per item, or an exception in an item's place for that
    item alone; if it raises, every item of the group gets that error.
    """

    def __init__(self, handle: Callable[[list[Any]], Sequence[Any]], max_in_flight: int = 1):
        self._handle = handle
        self._max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._in_flight = 0

    def run(self, item: Any) -> Any:
        """Handle an item with whatever else is waiting; return its outcome or raise its error."""
        me = _Waiting(item)
        with self._lock:
            if self._in_flight < self._max_in_flight:
                self._in_flight += 1
                me.leads = True
            else:
                self._waiting.append(me)
        if not me.leads:
            me.turn.wait()  # set once handled, or when handed a place to handle the next group
        if me.leads:
            self._handle_group(me)
        if me.error is not None:
            raise me.error
        return me.outcome

    def _handle_group(self, leader: _Waiting) -> None:
        with self._lock:
            group, self._waiting = [leader, *self._waiting], []
        try:
            outcomes = self._handle([waiting.item for waiting in group])
            for waiting, outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    waiting.error = outcome
                else:
                    waiting.outcome = outcome
        except BaseException as exc:  # every caller must hear of it, or it would wait forever
            for waiting in group:
                waiting.error = exc
        finally:
            with self._lock:
                # This call's place passes to the first caller waiting (taken off the list, so
                # that no other ending call hands it a second place), or is given up.
                following = self._waiting.pop(0) if self._waiting else None
                if following is None:
                    self._in_flight -= 1
                else:
                    following.leads = True
            for waiting in group:
                waiting.leads = False
                waiting.turn.set()
            if following is not None:
                following.turn.set()
