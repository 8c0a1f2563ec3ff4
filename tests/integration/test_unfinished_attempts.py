"""What a generation attempt stopped before its end writes, on a real database and Redis: a
cancelled one streams its last text and is charged; one whose job another attempt took over
writes nothing, neither text to the job's stream nor a charge."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from services.domain.jobs import cancel_job
from services.domain.keys import Caller
from shared import token_stream
from shared.models import Job, UsageRecord
from tests.integration.helpers import claim, lapse_lease, queued_job
from workers.generation import GenerationOutput
from workers.generation_job import _store_outcome
from workers.job_guard import StopReason
from workers.token_publisher import TokenPublisher

pytestmark = pytest.mark.timeout(60)

OUTPUT = GenerationOutput(text="two words", finish_reason="length", token_ids=[7, 8], prompt_tokens=3,
                          seconds=0.5, gpu_seconds=0.4)


def stream_of(rt, job_id: str) -> list[tuple[str, int | None, str]]:
    """The job's token stream as (type, attempt, text) entries."""
    return [(entry["type"], entry.get("attempt"), entry.get("text", entry.get("status", "")))
            for entry in token_stream.read_entries(rt.redis, job_id)]


def charges(rt, job_id: str) -> list[str]:
    with rt.db.session_scope(read_only=True) as session:
        return list(session.scalars(select(UsageRecord.status).where(UsageRecord.job_id == job_id)))


def test_an_attempt_whose_job_was_taken_over_writes_nothing_to_the_next_attempts_stream(rt):
    job_id = queued_job(rt.db)
    lost = claim(rt.db, job_id, rt.worker_id)
    lapse_lease(rt.db, job_id)
    assert claim(rt.db, job_id, "worker-b").attempt == 2
    token_stream.start_attempt(rt.redis, job_id, 2)  # worker-b's attempt began streaming
    publisher = TokenPublisher(rt.redis, None, job_id, lost.attempt, [])

    _store_outcome(rt, lost, OUTPUT, publisher, StopReason.LEASE_LOST, 30)

    assert stream_of(rt, job_id) == [("attempt", 2, "")]
    assert charges(rt, job_id) == []  # worker-b's attempt charges what it runs
    with rt.db.session_scope(read_only=True) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.worker_id, job.attempts) == ("running", "worker-b", 2)


def test_a_cancelled_attempt_streams_its_last_text_and_is_charged_once(rt):
    job_id = queued_job(rt.db)
    held = claim(rt.db, job_id, rt.worker_id)
    with rt.db.session_scope() as session:
        cancel_job(session, Caller(key_id=held.owner_key_id, role="user"), job_id)
    publisher = TokenPublisher(rt.redis, None, job_id, held.attempt, [])

    _store_outcome(rt, held, OUTPUT, publisher, StopReason.CANCELLED, 30)

    assert stream_of(rt, job_id) == [("attempt", 1, ""), ("token", 1, "two words"), ("end", None, "cancelled")]
    assert charges(rt, job_id) == ["cancelled"]
