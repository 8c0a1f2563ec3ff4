"""Group commit: concurrent callers' items written together, each caller answered with its own outcome."""

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


class GroupCommit:
    """Write items in groups: whatever arrives while a group is being written forms the next one.

    No caller waits for a timer. A caller that finds no write in progress writes at once (alone,
    if the server is idle); callers that arrive meanwhile queue up, and when that write ends the
    first of them writes all of them in one go. Under load a group costs about one write, so a
    server busy with submits makes one database round trip and one commit per group, not per
    submit.

    `write(items)` returns one outcome per item, or an exception (BaseException included) in an
    item's place for that item alone; if it raises, every item of the group gets that error.
    """

    def __init__(self, write: Callable[[list[Any]], Sequence[Any]]):
        self._write = write
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._writing = False

    def submit(self, item: Any) -> Any:
        """Write an item with whatever else is waiting; return its outcome or raise its error."""
        me = _Waiting(item)
        with self._lock:
            self._waiting.append(me)
            if not self._writing:
                self._writing = me.leads = True
        if not me.leads:
            me.turn.wait()  # set once written, or when handed the next group to write
        if me.leads:
            self._write_group()
        if me.error is not None:
            raise me.error
        return me.outcome

    def _write_group(self) -> None:
        with self._lock:
            group, self._waiting = self._waiting, []
        try:
            outcomes = self._write([waiting.item for waiting in group])
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
                following = self._waiting[0] if self._waiting else None
                if following is None:
                    self._writing = False
                else:
                    following.leads = True
            for waiting in group:
                waiting.leads = False
                waiting.turn.set()
            if following is not None:
                following.turn.set()
