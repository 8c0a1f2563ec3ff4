"""How the result writer process takes finished jobs off its pipe: all that are there, a short
wait for more while tasks run, and the pipe's end seen whether closed or abandoned."""

from __future__ import annotations

import multiprocessing
import time

from workers.result_process import LINGER_S, LINGER_UNTIL, _gather


def pipe():
    receiver, sender = multiprocessing.Pipe(duplex=False)
    return receiver, sender


def test_it_takes_everything_waiting_at_once_when_no_task_runs():
    receiver, sender = pipe()
    for job in range(LINGER_UNTIL + 3):
        sender.send(job)
    started = time.monotonic()
    assert _gather(receiver, True, lambda: False) == (list(range(LINGER_UNTIL + 3)), True)
    assert time.monotonic() - started < LINGER_S


def test_while_a_task_runs_it_waits_a_little_for_more_then_writes_what_it_has():
    receiver, sender = pipe()
    sender.send("first")
    started = time.monotonic()
    assert _gather(receiver, True, lambda: True) == (["first"], True)
    assert time.monotonic() - started >= LINGER_S * 0.9


def test_with_nothing_to_announce_it_waits_for_the_first_job():
    receiver, sender = pipe()
    assert _gather(receiver, False, lambda: False) == ([], True)  # something to announce: no wait
    sender.send("late")
    assert _gather(receiver, True, lambda: False) == (["late"], True)


def test_the_end_of_the_pipe_closes_it_after_the_jobs_before_it():
    receiver, sender = pipe()
    sender.send("last")
    sender.send(None)  # the worker's word to stop
    assert _gather(receiver, True, lambda: True) == (["last"], False)
    receiver, sender = pipe()
    sender.send("orphan")
    sender.close()  # the worker died
    assert _gather(receiver, True, lambda: True) == (["orphan"], False)
