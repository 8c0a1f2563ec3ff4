"""A job's generated tokens as a Redis Stream: workers append, the gateway reads them live.

One stream per job under `gemma-jobs:job-stream:<job_id>`; every entry is flat string fields
with a `type`:

- `attempt` (`attempt`): a worker started attempt n; text of earlier attempts is void.
- `token` (`attempt`, `text`, `token_ids` as a JSON list): new text and ids of that attempt.
- `end` (`status`): the worker is done with the job.

The stream is a convenience for watching a job; the job row in the database stays the truth
(a job cancelled while queued or expired by the reaper never gets an `end` entry).
Writers take a Redis client or a pipeline, so a worker may batch its writes.
"""

from __future__ import annotations

import json
from typing import Any

KEY_PREFIX = "gemma-jobs:job-stream:"
# Approximate trimming (~) is O(1) per XADD; a generation is far shorter than this anyway.
MAX_ENTRIES = 100_000
# Set at each attempt so that a stream whose worker died before end_stream still goes away.
ABANDONED_TTL_S = 86_400
READ_COUNT = 1000


def stream_key(job_id: str) -> str:
    """Return the Redis key of a job's token stream."""
    return KEY_PREFIX + job_id


def _add(client: Any, job_id: str, fields: dict[str, str]) -> None:
    client.xadd(stream_key(job_id), fields, maxlen=MAX_ENTRIES, approximate=True)


def start_attempt(client: Any, job_id: str, attempt: int) -> None:
    """Mark the start of an attempt: readers drop the text of earlier attempts."""
    _add(client, job_id, {"type": "attempt", "attempt": str(attempt)})
    client.expire(stream_key(job_id), ABANDONED_TTL_S)


def append_tokens(client: Any, job_id: str, attempt: int, text: str, token_ids: list[int]) -> None:
    """Append newly generated text and its token ids."""
    _add(
        client,
        job_id,
        {"type": "token", "attempt": str(attempt), "text": text, "token_ids": json.dumps(token_ids)},
    )


def end_stream(client: Any, job_id: str, status: str, ttl_s: int = 3600) -> None:
    """Mark the stream finished and let Redis drop it ttl_s seconds later."""
    _add(client, job_id, {"type": "end", "status": status})
    client.expire(stream_key(job_id), ttl_s)


def read_entries(
    client: Any, job_id: str, after_id: str = "0", block_ms: int | None = None, count: int = READ_COUNT
) -> list[dict[str, Any]]:
    """Return up to `count` entries after `after_id`, parsed, each with its entry `id`.

    `block_ms` waits that long for a first entry when none is there yet; None does not wait
    (Redis reads BLOCK 0 as "forever", so 0 is refused).
    """
    if block_ms is not None and block_ms <= 0:
        raise ValueError("block_ms must be positive or None")
    reply = client.xread({stream_key(job_id): after_id}, count=count, block=block_ms)
    # RESP2 answers [[key, entries]], RESP3 {key: [entries]}; nil (None) after a block timeout.
    streams = reply.values() if isinstance(reply, dict) else [entries for _, entries in reply or []]
    return [parse_entry(entry_id, fields) for entries in streams for entry_id, fields in entries]


def read_between(client: Any, job_id: str, after_millis: int | None, until_millis: int | None,
                 count: int = MAX_ENTRIES) -> list[dict[str, Any]]:
    """Return the entries added after `after_millis` and up to `until_millis` (unix ms, whole
    milliseconds, None: no bound), parsed, oldest first."""
    start = "-" if after_millis is None else str(after_millis + 1)
    end = "+" if until_millis is None else str(until_millis)  # "<ms>" ends at that ms's last entry
    return [parse_entry(entry_id, fields) for entry_id, fields in client.xrange(stream_key(job_id), start, end, count)]


def parse_entry(entry_id: bytes | str, fields: dict[Any, Any]) -> dict[str, Any]:
    """Turn a raw stream entry into a dict with typed values and its `id`."""
    entry = {_text(key): _text(value) for key, value in fields.items()}
    if "attempt" in entry:
        entry["attempt"] = int(entry["attempt"])
    if "token_ids" in entry:
        entry["token_ids"] = json.loads(entry["token_ids"])
    entry["id"] = _text(entry_id)
    return entry


def entry_millis(entry_id: str) -> int:
    """Return the Redis server time (unix ms) at which an entry was added."""
    return int(entry_id.partition("-")[0])


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
