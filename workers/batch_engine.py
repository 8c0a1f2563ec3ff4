"""Continuous batching: many generation jobs share each forward pass of one model.

A job's thread hands its sequence to the engine and waits. The engine thread loops: admit
waiting sequences (each prefilled alone, then merged into the batch's KV cache), run one
decode step for every row, pick each row's token with that job's own sampler, and retire
rows that finished, at once, so a short job never waits for a long one and a waiting job
joins at the next step. Rows in a batch share one adapter (or none); a job for another
adapter waits until the rows ahead of it drain (first come, first served).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import DynamicCache

from workers.adapter_cache import AdapterUnavailable
from workers.batch_cache import BatchCache
from workers.generation import GenerationError, GenerationOutput, finish_text, prompt_ids_within_context
from workers.greedy_screen import GreedyScreen
from workers.model_loader import LoadedModel
from workers.sampling import Sampler
from workers.stopping import stop_string_seen
from workers.token_publisher import StepWrites

log = structlog.get_logger(__name__)

# The most prompt tokens (padding included) prefilled in one forward pass; a longer prompt
# is prefilled alone.
PREFILL_TOKENS = 8192


@dataclass
class Sequence:
    """One job's generation while it is in the engine."""

    prompt_ids: list[int]
    params: dict[str, Any]
    sampler: Sampler
    should_stop: Callable[[], bool] | None
    on_tokens: Callable[[list[int]], None] | None
    adapter_id: str | None
    adapter_path: Path | None
    tokens: list[int] = field(default_factory=list)
    gpu_seconds: float = 0.0  # this job's share of the forward passes it took part in
    submitted: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    output: GenerationOutput | None = None
    error: BaseException | None = None

    def result(self) -> GenerationOutput:
        """Wait until the engine is done with this sequence; return its output or raise its error."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.output

    def history(self) -> torch.Tensor:
        """Return the prompt and the tokens so far (what a repetition penalty looks at)."""
        return torch.tensor(self.prompt_ids + self.tokens)


class BatchEngine:
    """Runs up to `max_batch` sequences of one model together, one token per row per step."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int,
        adapters=None,
        static: bool = False,
        cpu_threads=None,
        step_writes: StepWrites | None = None,
        greedy_screen: GreedyScreen | None = None,
    ):
        self.loaded = loaded
        self.max_batch = max_batch
        # Static batching (a benchmark baseline): admit only into an empty batch.
        self.static = static
        self.adapters = adapters  # the worker's AdapterCache; None runs the bare model
        self.cpu_threads = cpu_threads  # a CPU worker's CpuThreads; applied in the thread that steps
        # Token-stream writes that jobs' `on_tokens` queue during a step; sent before any job is handed back.
        self.step_writes = step_writes
        # Picks greedy rows' tokens without the float32 output layer (base-model batches only).
        self.greedy_screen = greedy_screen
        config = loaded.model.config
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
        self.batch = BatchCache(config.sliding_window if sliding else None)
        self.active: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.group: str | None = None  # adapter of the rows now in the batch
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(
        self,
        params: dict[str, Any],
        *,
        should_stop: Callable[[], bool] | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
        adapter_id: str | None = None,
        adapter_path: Path | None = None,
    ) -> Sequence:
        """Queue one job's generation; a bad prompt raises GenerationError here, in the caller."""
        sequence = Sequence(
            prompt_ids=prompt_ids_within_context(self.loaded, params),
            params=params,
            sampler=Sampler(params, self.loaded.device),
            should_stop=should_stop,
            on_tokens=on_tokens,
            adapter_id=adapter_id,
            adapter_path=adapter_path,
        )
        with self._wake:
            self.waiting.append(sequence)
            self._wake.notify()
        return sequence

    def generate(self, params: dict[str, Any], **kwargs) -> GenerationOutput:
        """Run one job's generation with whatever else is running, and wait for its output."""
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
                self._thread.start()
        return self.submit(params, **kwargs).result()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.active and not self.waiting:
                    self._wake.wait()
            self.step()

    def step(self) -> None:
        """One scheduling round: admit, decode one token for every row, retire finished rows."""
        if self.cpu_threads is not None:
            self.cpu_threads.apply()
        self._drop_stopped_waiting()
        joining = self._admit()
        try:
            with torch.inference_mode(), self._model_for_group(joining) as model:
                for chunk in _prefill_chunks(joining):
                    self._prefill(model, chunk)
                self._retire()
                if self.active:
                    self._decode(model)
        except Exception as exc:  # noqa: BLE001 - fail these jobs, keep the engine serving
            log.exception("batch_step_failed", rows=len(self.active))
            for sequence in self.active + joining:
                if not sequence.done.is_set():
                    self._complete(sequence, error=_as_generation_error(exc))
            self.active = []
            self.batch.keep([])
            return
        self._retire()

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences, oldest first, while there is room and they share the batch's adapter."""
        joining: list[Sequence] = []
        with self._wake:
            if self.static and self.active:
                return joining
            if not self.active and self.waiting:
                self.group = self.waiting[0].adapter_id
            while (
                self.waiting
                and len(self.active) + len(joining) < self.max_batch
                and self.waiting[0].adapter_id == self.group
            ):
                joining.append(self.waiting.popleft())
        return joining

    def _drop_stopped_waiting(self) -> None:
        """Hand back, unrun, waiting sequences whose job was cancelled or stopped: a job waiting
        for the batch's adapter to change must not wait for the rows ahead to drain to stop."""
        with self._wake:
            stopped = [s for s in self.waiting if s.should_stop is not None and s.should_stop()]
            for sequence in stopped:
                self.waiting.remove(sequence)
        for sequence in stopped:
            self._complete(sequence)

    def _model_for_group(self, joining: list[Sequence]):
        """Return a context giving the model with the batch's adapter active (or none)."""
        if self.adapters is None:
            return nullcontext(self.loaded)
        path = next((s.adapter_path for s in self.active + joining if s.adapter_id == self.group), None)
        return self.adapters.applied(self.loaded, self.group, path)

    def _prefill(self, loaded: LoadedModel, joining: list[Sequence]) -> None:
        """Run new sequences' prompts in one left-padded pass, pick their first tokens, add them as rows."""
        started = time.monotonic()
        device = self.loaded.device
        width = max(len(s.prompt_ids) for s in joining)
        pad = self.loaded.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in joining], device=device)
        starts = torch.tensor([width - len(s.prompt_ids) for s in joining], device=device)
        valid = torch.arange(width, device=device)[None, :] >= starts[:, None]
        try:
            rows_cache = DynamicCache()
            tokens = self._forward_and_pick(
                loaded,
                joining,
                input_ids=input_ids,
                attention_mask=valid.long(),
                position_ids=(valid.long().cumsum(dim=1) - 1).clamp(min=0),
                cache=rows_cache,
                use_cache=True,
            )
        except Exception as exc:  # noqa: BLE001 - these prompts failed; the batch goes on
            log.exception("prefill_failed", rows=len(joining))
            for sequence in joining:
                self._complete(sequence, error=_as_generation_error(exc))
            return
        self.batch.add(rows_cache, valid)
        share = (time.monotonic() - started) / len(joining)
        for sequence, token in zip(joining, tokens):
            sequence.gpu_seconds += share
            self.active.append(sequence)
            self._append(sequence, token)

    def _decode(self, loaded: LoadedModel) -> None:
        """Feed every row its newest token and pick the next one."""
        started = time.monotonic()
        last = torch.tensor([[s.tokens[-1]] for s in self.active], device=self.loaded.device)
        tokens = self._forward_and_pick(loaded, self.active, input_ids=last, use_cache=True, **self.batch.step_inputs())
        for sequence, token in zip(self.active, tokens):
            self._append(sequence, token)
        share = (time.monotonic() - started) / len(self.active)
        for sequence in self.active:
            sequence.gpu_seconds += share

    def _forward_and_pick(self, loaded: LoadedModel, rows: list[Sequence], **inputs) -> list[int]:
        """Run one forward pass over `rows` and pick each row's next token with its own sampler."""
        screen = self.greedy_screen if self.group is None else None
        if screen is None:
            logits = loaded.model(**inputs, logits_to_keep=1).logits[:, -1]
            greedy = logits.argmax(dim=-1).tolist()  # one batched argmax serves most rows
            return [
                greedy[row] if s.sampler.plain_greedy else s.sampler.pick(logits[row], s.history())
                for row, s in enumerate(rows)
            ]
        hidden = loaded.model.model(**inputs).last_hidden_state[:, -1]
        plain = [row for row, s in enumerate(rows) if s.sampler.plain_greedy]
        others = [row for row, s in enumerate(rows) if not s.sampler.plain_greedy]
        tokens = dict(zip(plain, screen.pick(hidden[plain]))) if plain else {}
        if others:  # sampling and penalties need every logit of their rows
            for row, row_logits in zip(others, _output_logits(loaded.model, hidden[others])):
                tokens[row] = rows[row].sampler.pick(row_logits, rows[row].history())
        return [tokens[row] for row in range(len(rows))]

    def _append(self, sequence: Sequence, token: int) -> None:
        sequence.tokens.append(token)
        if sequence.on_tokens is not None:
            sequence.on_tokens(sequence.tokens)

    def _retire(self) -> None:
        """Finish every row that is done and drop it from the batch."""
        self._flush_writes()
        keep = []
        for row, sequence in enumerate(self.active):
            if self._finished(sequence):
                self._complete(sequence)
            else:
                keep.append(row)
        if len(keep) < len(self.active):
            self.active = [self.active[row] for row in keep]
            self.batch.keep(keep)

    def _finished(self, sequence: Sequence) -> bool:
        tokens, params = sequence.tokens, sequence.params
        return bool(
            (tokens and tokens[-1] in self.loaded.eos_token_ids)
            or len(tokens) >= params["max_new_tokens"]
            or (params.get("stop") and stop_string_seen(self.loaded.tokenizer, tokens, params["stop"]))
            or (sequence.should_stop is not None and sequence.should_stop())
        )

    def _complete(self, sequence: Sequence, error: BaseException | None = None) -> None:
        """Hand a sequence's output (or error) back to the job thread waiting for it."""
        self._flush_writes()  # its thread writes the stream's end next; earlier writes go first
        if error is None:
            text, reason = finish_text(self.loaded, sequence.tokens, sequence.params)
            sequence.output = GenerationOutput(
                text=text,
                finish_reason=reason,
                token_ids=list(sequence.tokens),
                # A sequence that never joined the batch did not read its prompt.
                prompt_tokens=len(sequence.prompt_ids) if sequence.tokens else 0,
                seconds=time.monotonic() - sequence.submitted,
                gpu_seconds=sequence.gpu_seconds,
            )
        sequence.error = error
        sequence.done.set()


    def _flush_writes(self) -> None:
        if self.step_writes is not None:
            self.step_writes.flush()


def _prefill_chunks(joining: list[Sequence]) -> list[list[Sequence]]:
    """Group joining sequences, in order, so no prefill pass exceeds PREFILL_TOKENS (padding included)."""
    chunks: list[list[Sequence]] = []
    for sequence in joining:
        chunk = chunks[-1] if chunks else None
        if chunk is not None:
            width = max(len(sequence.prompt_ids), *(len(s.prompt_ids) for s in chunk))
            if width * (len(chunk) + 1) <= PREFILL_TOKENS:
                chunk.append(sequence)
                continue
        chunks.append([sequence])
    return chunks


def _output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Return a causal LM's logits for final hidden states: what its forward does after the layers."""
    logits = model.lm_head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def generate_alone(loaded: LoadedModel, params: dict[str, Any], **kwargs) -> GenerationOutput:
    """Run one job's generation in this thread (tests, benchmarks, one-off use)."""
    engine = BatchEngine(loaded, max_batch=1)
    sequence = engine.submit(params, **kwargs)
    while not sequence.done.is_set():
        engine.step()
    return sequence.result()


def _as_generation_error(exc: Exception) -> GenerationError:
    if isinstance(exc, GenerationError):
        return exc
    if isinstance(exc, AdapterUnavailable):
        return GenerationError("adapter_unavailable", str(exc))
    return GenerationError("internal_error", f"{exc.__class__.__name__}: {exc}")
