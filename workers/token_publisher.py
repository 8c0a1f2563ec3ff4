"""Publishing a running job's new text to its Redis token stream, a few tokens at a time."""

from __future__ import annotations

import redis
import structlog
from transformers import PreTrainedTokenizerBase

from shared import token_stream

log = structlog.get_logger(__name__)


class TokenPublisher:
    """Turns a job's growing token list into text deltas and appends them to its stream.

    Decoding is incremental (only the tokens since the last complete character are decoded
    again), text that could still turn out to be the start of a stop string is held back, and
    a byte-fallback token that leaves half a character is held until the character completes.
    """

    def __init__(self, client: redis.Redis, tokenizer: PreTrainedTokenizerBase, job_id: str, attempt: int,
                 stop: list[str]):
        self.client = client
        self.tokenizer = tokenizer
        self.job_id = job_id
        self.attempt = attempt
        self.stop = stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # decoded text of the tokens up to `decoded`
        self.decoded = 0
        self.sent_chars = 0
        self.sent_tokens = 0
        self.failed = False
        self._call(token_stream.start_attempt, attempt)

    def update(self, token_ids: list[int]) -> None:
        """Publish what became certain since the last call (called after each step)."""
        pending = self.tokenizer.decode(token_ids[self.decoded :], skip_special_tokens=True)
        if pending.endswith("\ufffd"):
            return  # half a character: wait for the token that completes it
        self.text += pending
        self.decoded = len(token_ids)
        # Text before a completed stop string is final; so is text too far back to begin one.
        cuts = [index for index in (self.text.find(s) for s in self.stop) if index >= 0]
        self._send(min([len(self.text) - self.hold_back, *cuts]), token_ids)

    def finish(self, final_text: str, token_ids: list[int]) -> None:
        """Publish the rest of the final text (already cut at a stop string)."""
        self.text = final_text
        self._send(len(final_text), token_ids)

    def _send(self, upto: int, token_ids: list[int]) -> None:
        if upto <= self.sent_chars:
            return
        delta = self.text[self.sent_chars : upto]
        self._call(token_stream.append_tokens, self.attempt, delta, token_ids[self.sent_tokens :])
        self.sent_chars, self.sent_tokens = upto, len(token_ids)

    def _call(self, write, *args) -> None:
        """Write to Redis; a stream is a convenience, so an outage only stops this job's stream."""
        if self.failed:
            return
        try:
            write(self.client, self.job_id, *args)
        except redis.RedisError as exc:
            self.failed = True
            log.warning("token_stream_unavailable", error=str(exc))
