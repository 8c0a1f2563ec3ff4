"""Delivery settings that long GPU jobs rely on."""

from __future__ import annotations

import logging

import pytest

from shared.celery_app import make_celery, queue_for, task_for_queue
from shared.logging import CELERY_TASK_LOGGERS, quiet_celery_task_lines


def test_delivery_is_json_late_ack_prefetch_one():
    conf = make_celery("redis://127.0.0.1:6379/0").conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 12 * 3600


def test_a_short_visibility_timeout_gets_frequent_restore_sweeps():
    options = make_celery("redis://127.0.0.1:6379/0", visibility_timeout_s=4).conf.broker_transport_options
    assert options == {"visibility_timeout": 4, "unacked_restore_interval": 2, "unacked_restore_throttle": 1}


def test_queues_name_kind_and_model():
    queue = queue_for("generation", "gemma-3-270m")
    assert queue == "generation.gemma-3-270m"
    assert task_for_queue(queue) == "gemma_jobs.generate"


@pytest.fixture()
def celery_task_loggers():
    """Celery's per-task loggers, with their levels put back afterwards."""
    loggers = [logging.getLogger(name) for name in CELERY_TASK_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.NOTSET)
    yield loggers
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def test_celery_s_per_task_lines_are_left_to_debug_logging(celery_task_loggers):
    quiet_celery_task_lines("debug")
    assert [logger.level for logger in celery_task_loggers] == [logging.NOTSET] * 2  # untouched
    quiet_celery_task_lines("info")
    assert [logger.level for logger in celery_task_loggers] == [logging.WARNING] * 2
    assert all(logger.isEnabledFor(logging.ERROR) and not logger.isEnabledFor(logging.INFO)
               for logger in celery_task_loggers)
