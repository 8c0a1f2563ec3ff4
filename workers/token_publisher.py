"""Publishing a running job's new text to its Redis token stream, a few tokens at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis
import structlog

from shared import token_stream
from workers.token_kinds import byte_tokens, special_tokens

if TYPE_CHECKING:  # the result writer process runs `write_tokens` without transformers
    from transformers import PreTrainedTokenizerBase

log = structlog.get_logger(__name__)


class TokenPublisher:
    """Turns a job's growing token list into text deltas and appends them to its stream.

    Decoding is incremental (only the tokens since the last decoded ones), text that could still
    turn out to be the start of a stop string is held back, and a run of byte-fallback tokens is
    held until it ends: the decoder decodes a run as a whole (a stray byte voids the characters
    before it in the run), so decoded apart it could give other text than the job's result.
    """

    def __init__(self, client: redis.Redis, tokenizer: PreTrainedTokenizerBase, job_id: str, attempt: int,
                 stop: list[str], step_writes: StepWrites | None = None):
        self.client = client
        # The engine's per-step batch for `update` (called in the engine thread); None writes at once.
        self.step_writes = step_writes
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
        # The attempt's start marker goes out with its first text: one round trip less a job.
        self.started = False

    def update(self, token_ids: list[int]) -> None:
        """Publish what became certain since the last call (called after each step)."""
        if self._in_byte_run(token_ids):
            return  # inside a run of byte tokens: wait for the token that ends it
        pending = self.tokenizer.decode(token_ids[self.decoded :], skip_special_tokens=True)
        self.text += pending
        self.decoded = len(token_ids)
        # Text before a completed stop string is final; so is text too far back to begin one.
        cuts = [index for index in (self.text.find(s) for s in self.stop) if index >= 0]
        self._send(min([len(self.text) - self.hold_back, *cuts]), token_ids, self.step_writes)

    def _in_byte_run(self, token_ids: list[int]) -> bool:
        """Whether the last token that decodes to something is a byte: the decoder skips special
        tokens and joins the bytes around them into one run."""
        specials = special_tokens(self.tokenizer)
        last = next((token for token in reversed(token_ids) if token not in specials), None)
        return last in byte_tokens(self.tokenizer)

    def finish(self, final_text: str, token_ids: list[int], writes: StreamTail | None = None) -> None:
        """Publish the rest of the final text (already cut at a stop string): at once, or as
        data in `writes`, for the result writer process to send."""
        self.text = final_text
        self._send(len(final_text), token_ids, writes, last=True)
        self.ensure_started(writes)

    def ensure_started(self, writes: StreamTail | None = None) -> None:
        """Publish the attempt's start if no text did: readers drop an earlier attempt's text."""
        if not self.started:
            self.started = True
            if writes is None:
                self._call(token_stream.start_attempt, self.attempt)
            else:
                writes.append(self, self.attempt, None, [], True)

    def _send(self, upto: int, token_ids: list[int], step_writes: StepWrites | None, last: bool = False) -> None:
        # The last write also carries ids that added no text (an end-of-turn token, one that
        # completed a stop string at the text already sent): the stream's ids are the result's.
        if self.failed or (upto <= self.sent_chars and not (last and len(token_ids) > self.sent_tokens)):
            return
        start, self.started = not self.started, True
        args = (self.attempt, self.text[self.sent_chars : upto], token_ids[self.sent_tokens :], start)
        if step_writes is None:
            self._call(write_tokens, *args)
        else:
            step_writes.append(self, *args)
        self.sent_chars, self.sent_tokens = max(upto, self.sent_chars), len(token_ids)

    def _call(self, write, *args) -> None:
        """Write to Redis; a stream is a convenience, so an outage only stops this job's stream."""
        if self.failed:
            return
        try:
            # One round trip, however many commands the write is (a start and text are three).
            with self.client.pipeline(transaction=False) as pipe:
                write(pipe, self.job_id, *args)
                pipe.execute()
        except redis.RedisError as exc:
            self.stop_streaming(exc)

    def stop_streaming(self, error: Exception) -> None:
        """Write nothing more: a stream with a lost delta in the middle would tell a wrong text."""
        self.failed = True
        log.warning("token_stream_unavailable", job_id=self.job_id, error=str(error))


def write_tokens(client, job_id: str, attempt: int, text: str | None, token_ids: list[int], start: bool) -> int:
    """Add new text (None: none) to a stream, after the attempt's start if `start`; return the
    commands sent."""
    commands = 0
    if start:
        token_stream.start_attempt(client, job_id, attempt)
        commands += 2
    if text is not None:
        token_stream.append_tokens(client, job_id, attempt, text, token_ids)
        commands += 1
    return commands


def execute_each(pipe: redis.client.Pipeline, counts: list[int]) -> list[Exception | None]:
    """Run a pipeline made of writes of `counts` commands each; return each write's first error
    (a lost connection is every write's)."""
    try:
        results = pipe.execute(raise_on_error=False)
    except redis.RedisError as exc:
        return [exc if count else None for count in counts]
    errors, done = [], 0
    for count in counts:
        errors.append(next((result for result in results[done : done + count] if isinstance(result, Exception)), None))
        done += count
    return errors


class StepWrites:
    """The token-stream writes of one engine step, sent to Redis in one round trip.

    One XADD per row per step costs a round trip each; on a GPU, where a step of 16 rows takes
    ~15 ms, 16 of them (~1.5 ms here) are a tenth of the step. The engine thread adds writes while it steps and calls
    `flush` before it hands any job back, so a job's final write (sent by its own thread) never
    overtakes the ones before it.
    """

    def __init__(self, client: redis.Redis):
        self.client = client
        self._pending: list[tuple[TokenPublisher, tuple]] = []

    def append(self, publisher: TokenPublisher, attempt: int, text: str | None, token_ids: list[int],
               start: bool) -> None:
        """Queue new text (None: none) of `publisher`'s stream (after its start, if `start`) until
        the next flush."""
        self._pending.append((publisher, (attempt, text, token_ids, start)))

    def flush(self) -> None:
        """Send the queued writes in one round trip; a failed write stops only its own job's stream."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        pipe = self.client.pipeline(transaction=False)
        commands = [write_tokens(pipe, publisher.job_id, *args) for publisher, args in pending]
        for (publisher, _), error in zip(pending, execute_each(pipe, commands)):
            if error is not None and not publisher.failed:
                publisher.stop_streaming(error)


class StreamTail:
    """A job's last stream writes kept as data (`write_tokens`' arguments after the job id), to
    go with its result to the result writer process."""

    def __init__(self):
        self.writes: list[tuple] = []

    def append(self, _publisher: TokenPublisher, attempt: int, text: str | None, token_ids: list[int],
               start: bool) -> None:
        """Keep a write, as `StepWrites.append` queues one."""
        self.writes.append((attempt, text, token_ids, start))
