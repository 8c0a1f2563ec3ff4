"""`gemma-jobs up` stops on Ctrl-C or SIGTERM even when the signal lands in a finalizer."""

from __future__ import annotations

import weakref

import pytest

from services.stack import Stack
from shared.settings import load_settings


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_asked_for_inside_a_finalizer_is_not_lost(tmp_path):
    """Seen in CI: the KeyboardInterrupt raised while a garbage-collected HTTP pool's finalizer
    ran was printed and dropped, and `up` went on serving after its Ctrl-C."""
    stack = Stack(load_settings(data_dir=tmp_path), port=0)
    stack.check_alive()  # no stop asked for, no children: nothing to raise

    class Pool:
        """Stands in for any object with a finalizer (urllib3's pools have one)."""

    pool = Pool()
    weakref.finalize(pool, stack._interrupt)
    del pool  # the finalizer runs here; Python reports its KeyboardInterrupt and drops it
    with pytest.raises(KeyboardInterrupt):
        stack.check_alive()  # what the waiting loops call every 0.2-0.5 s
